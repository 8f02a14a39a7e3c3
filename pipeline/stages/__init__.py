"""The four model stages of the curation pipeline, each a Ray Data callable class.

============  ==========================================  =============================================
stage         class                                        reads -> writes (``pipeline.record.Record``)
============  ==========================================  =============================================
captioner     ``pipeline.stages.captioner:Captioner``      image -> ``captions`` (``llava:<prompt>``)
phrases       ``pipeline.stages.phrases:PhraseExpander``   ``captions`` -> ``phrases``
grounder      ``pipeline.stages.grounder:Grounder``        image, ``phrases`` -> ``boxes``
segmenter     ``pipeline.stages.segmenter:Segmenter``      image, ``boxes`` -> ``segments`` (COCO RLE)
============  ==========================================  =============================================

Use: ``ds.map_batches(Cls, fn_constructor_kwargs={"config": cfg}, batch_format="numpy",
batch_size=cfg.batch_size, num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus,
compute=ActorPoolStrategy(size=cfg.num_actors))``. The constructor loads the model once per actor
(a missing model or an inconsistent checkpoint raises there, stopping the job with one message);
``__call__`` never raises for one image: it sets ``record.fail(stage, reason)`` and passes records
that already failed through untouched. Configs live in :mod:`pipeline.stages.config`; this package
imports no model code until a stage module is imported.
"""

from .config import CaptionerConfig, GrounderConfig, PhraseConfig, SegmenterConfig, StageConfig

__all__ = ["CaptionerConfig", "GrounderConfig", "PhraseConfig", "SegmenterConfig", "StageConfig"]
