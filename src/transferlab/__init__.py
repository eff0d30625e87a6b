"""transferlab: source → target transfer experiments, composed by Hydra, trained by Lightning."""

__version__ = "0.1.0"
