"""Open-vocabulary semantic and part segmentation evaluation (ADE20K, Pascal Context, PartImageNet).

Not built yet: its issue has not landed. `make eval-ade20k` says so and exits non-zero.
"""
