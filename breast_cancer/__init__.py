__version__ = "0.1.0"

# wavelet registers the checks of its config sections (config.register_check): importing it here makes them apply to
# every load_config, while config itself imports nothing that comes after it
from . import wavelet as _wavelet  # noqa: E402
