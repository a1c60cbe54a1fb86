"""SD Studio: fine-tune and mix Stable Diffusion models from a browser UI or the command line."""
__version__ = "0.1.0"
