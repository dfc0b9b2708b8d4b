"""The loaders' errors, in a module of their own so that every reader (loading, safe_read) raises
the same classes without importing each other. Public through `vae_core.loading` as before."""


class VAELoadError(ValueError):
    """A file that is not a loadable VAE; the message names the file and the problem."""


class WeightsNotFoundError(VAELoadError, FileNotFoundError):
    """A diffusers folder without the weights file asked for (an OSError too, as diffusers raises)."""
