"""pyproject.toml's lower bounds exclude versions with published security fixes, so that an install
without constraints.txt cannot resolve to a vulnerable release."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

#: package -> first release with the fix (advisory)
SECURITY_FLOORS = {
    "torch": "2.6.0",  # CVE-2025-32434: torch.load(weights_only=True) remote code execution
    "pyarrow": "14.0.1",  # CVE-2023-47248: arbitrary code execution reading IPC / Parquet
    "pillow": "10.3.0",  # CVE-2023-50447 (ImageMath.eval), CVE-2024-28219 (buffer overflow)
    "transformers": "4.48.0",  # CVE-2024-11392/11393/11394: deserialisation of untrusted checkpoints
    "ray": "2.8.1",  # CVE-2023-48022 and others in the dashboard / job API
}


def test_lower_bounds_are_past_the_security_fixes():
    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {Requirement(d).name.lower(): Requirement(d) for d in deps}
    for name, fixed in SECURITY_FLOORS.items():
        spec = reqs[name].specifier
        floors = [Version(s.version) for s in spec if s.operator in (">=", ">", "==", "~=")]
        assert floors and min(floors) >= Version(fixed), f"{name}: {spec} admits versions before {fixed}"
