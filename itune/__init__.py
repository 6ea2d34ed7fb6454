"""itune: instruction tuning for decoder language models.

Data flows one way: raw sources -> packed Arrow shards + manifest (``itune.data``) -> DeepSpeed ZeRO-3
training (``itune.train``) -> held-out evaluation (``itune.eval``).
"""

__version__ = "0.1.0"
