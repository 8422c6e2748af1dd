"""Commands that measure a model or the package, ``python -m lld_lightning.tools.<name>``: ``tune``
(post-processing settings of a checkpoint), ``score_thresholds`` (per-class precision for the
pseudo-labeller's thresholds) ``benchmark`` (speed and memory against torchvision FCOS) and ``export`` (ONNX / TorchScript, also
``lld export``)."""
