"""fm_ray: scale-out FisherMask active learning on Ray (Gul et al., arXiv 2411.05752)."""

__version__ = "0.1.0"
