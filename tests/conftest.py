"""Shared pytest fixtures: the repository root, the bundled samples, and the full data in ../shared when present."""
import os
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'

@pytest.fixture(scope='session')
def repo_root() -> Path: return ROOT

@pytest.fixture(scope='session')
def mias_sample() -> Path: return ROOT / 'data' / 'mini-mias-256'

@pytest.fixture(scope='session')
def breakhis_sample() -> Path: return ROOT / 'data' / 'breakhis-sample'

@pytest.fixture(scope='session')
def shared_data() -> Path:
    "The full real data beside the checkout (../shared/data); tests that need it skip without it."
    if not SHARED_DATA.exists(): pytest.skip('../shared/data is not present')
    return SHARED_DATA

@pytest.fixture(scope='module')
def isolated_dirs(tmp_path_factory, request):
    "Private cache and runs folders (BREAST_CANCER_CACHE / BREAST_CANCER_RUNS) for one test module."
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit('.', 1)[-1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('BREAST_CANCER_CACHE', str(root / 'cache')); mp.setenv('BREAST_CANCER_RUNS', str(root / 'runs'))
        yield root
