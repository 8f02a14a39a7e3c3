"""Open-vocabulary semantic segmentation evaluation (ADE20K-150/847, Pascal Context-59/459, VOC-20, synth).

SAM automatic masks (:mod:`evaluation.proposals`, cached by :mod:`evaluation.proposal_cache`) or
ground-truth segments (oracle) -> USE mask embeddings -> class-text probabilities
(:mod:`evaluation.classify`) -> per-pixel vote (:mod:`evaluation.aggregate`) -> one confusion matrix
scored by detectron2's rules (:mod:`evaluation.metrics`). Datasets in the CAT-Seg / SED layouts
(:mod:`evaluation.datasets`); the driver is :mod:`evaluation.semseg`, on Ray Data actors
(:mod:`evaluation.distributed`); ``python -m evaluation --help`` lists the commands.
"""
