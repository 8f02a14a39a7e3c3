"""GPU suite: the curation and training models at full size with random weights, on one GPU.

``python -m benchmarks.gpu --out DIR`` (``--help``): SAM ViT-H (image encoder, box-prompt decoder,
automatic mask generation), Grounding DINO Swin-T and Swin-B, LLaVA-1.5-7B captioning, CLIP
ViT-L/14-336 + DINOv2-L features and the USE training step; images/s per batch size, peak memory and
model FLOP utilisation against the bf16 matmul rate measured in the same run, eager and
``torch.compile``; then a sizing table (GPUs per stage, GPU-hours per 10k images). Random weights do
the same arithmetic as trained ones, so no download is needed. ``--tiny`` runs the same code on
tiny configs on the CPU (the test suite does, so the suite cannot rot).

Modules: :mod:`.config` (typed settings, YAML in ``configs/``), :mod:`.arch` (the architectures),
:mod:`.measure` (timing, FLOPs, memory, records), :mod:`.models` (one benchmark per model),
:mod:`.cli` (one child process per model under a time budget), :mod:`.report` (tables, sizing).
"""
