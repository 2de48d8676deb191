__version__ = "0.1.0"

# The front door: the entry points a user starts from, importable as `from breast_cancer import Cascade`.
# Each is imported from its module on first use, so `import breast_cancer` stays fast and TensorFlow loads only
# when a name that needs it is asked for. The table is the whole public front: everything else lives in its module.
_FRONT = {
    'load_config': 'config', 'Config': 'config', 'RunDir': 'rundir',
    'read_image': 'io', 'load_dataset': 'data', 'patient_split': 'data',
    'WaveletPreprocessor': 'wavelet', 'build_model': 'model',
    'Cascade': 'cascade', 'run_from_config': 'cascade', 'cross_validate': 'cascade',
    'evaluate_run': 'evaluate', 'run_reports': 'report',
}
__all__ = ['__version__', *_FRONT]

def __getattr__(name):
    if name in _FRONT:
        import importlib
        value = getattr(importlib.import_module(f'breast_cancer.{_FRONT[name]}'), name)
        globals()[name] = value   # once found, a plain attribute
        return value
    raise AttributeError(f"module 'breast_cancer' has no attribute {name!r}")

def __dir__(): return sorted(set(globals()) | set(_FRONT))
