"""Two-stage video action recognition: cache MobileNetV2 frame features, train temporal models on them."""

__version__ = "0.1.0"
