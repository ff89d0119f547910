"""pix2rep: dense self-supervised pixel representations (Pix2Rep, MIDL 2024) for few-shot
segmentation of cardiac MRI. For research, not for clinical use."""

__version__ = "0.1.0"
