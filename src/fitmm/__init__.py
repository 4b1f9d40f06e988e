"""fitmm: multimodal recommendation (FITMM and baselines) — data, training, evaluation, CLI."""

__version__ = "0.1.0"


def load(run_dir, device: str = "cpu", data=None):
    """The trained model of a run directory as a `fitmm.api.Recommender` (see fitmm.api)."""
    from .api import load as load_api  # torch is imported only when a run is loaded

    return load_api(run_dir, device, data)
