"""Shared pytest fixtures: the repository root, the bundled samples, the full data in ../shared when present, and two
guards for the whole suite: no connection beyond this machine (loopback only), and a checkout left as it was found."""
import ipaddress, os, socket, subprocess, sys
from pathlib import Path
import pytest

# With stdin closed (CI, cron), importing keras fails at collection: keras imports IPython, which asks stdin's encoding,
# and pytest's capture asserts that sys.__stdin__ exists. Open /dev/null in its place (it takes the free fd 0).
if sys.__stdin__ is None: sys.__stdin__ = open(os.devnull)

os.environ.setdefault('MPLBACKEND', 'Agg')
from breast_cancer.core import quiet_tensorflow
quiet_tensorflow()   # TensorFlow's C++ log off in this process and the commands it starts (TF_CPP_MIN_LOG_LEVEL=3)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('BREAST_CANCER_SHARED') or ROOT.parent / 'shared')   # ../shared beside the checkout
SHARED_DATA = SHARED / 'data'

@pytest.fixture(scope='session')
def repo_root() -> Path: return ROOT

@pytest.fixture(scope='session')
def mias_sample() -> Path: return ROOT / 'breast_cancer' / 'samples' / 'mini-mias-256'  # shipped in the wheel

@pytest.fixture(scope='session')
def breakhis_sample() -> Path: return ROOT / 'breast_cancer' / 'samples' / 'breakhis-sample'

@pytest.fixture(scope='session')
def shared_data() -> Path:
    "The full real data beside the checkout (../shared/data); tests that need it skip without it."
    if not SHARED_DATA.exists(): pytest.skip('../shared/data is not present')
    return SHARED_DATA

@pytest.fixture(scope='session')
def published_results_md() -> Path:
    "../shared/PUBLISHED_RESULTS.md, the sources' published numbers; tests that need it skip without it."
    path = SHARED / 'PUBLISHED_RESULTS.md'
    if not path.exists(): pytest.skip('../shared/PUBLISHED_RESULTS.md is not present')
    return path

def _private_dirs(mp: pytest.MonkeyPatch, root: Path):
    for var, sub in (('BREAST_CANCER_CACHE', 'cache'), ('BREAST_CANCER_RUNS', 'runs'), ('BREAST_CANCER_REPORTS', 'reports')):
        mp.setenv(var, str(root / sub))

@pytest.fixture(scope='session', autouse=True)
def session_output_dirs(tmp_path_factory):
    """Every test's image cache, runs and reports go to a temporary folder unless it asks for its own (subprocesses inherit
    it), and no proxy is used: local test servers are reached directly."""
    root = tmp_path_factory.mktemp('session')
    with pytest.MonkeyPatch.context() as mp:
        _private_dirs(mp, root)
        for var in ('HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy'):
            mp.delenv(var, raising=False)                       # a developer's proxy is not on this machine
        mp.setenv('NO_PROXY', '127.0.0.1,localhost,::1'); mp.setenv('no_proxy', '127.0.0.1,localhost,::1')
        yield root

@pytest.fixture(scope='module')
def isolated_dirs(tmp_path_factory, request):
    "Private cache, runs and reports folders (BREAST_CANCER_CACHE / _RUNS / _REPORTS) for one test module."
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit('.', 1)[-1])
    with pytest.MonkeyPatch.context() as mp:
        _private_dirs(mp, root); yield root


# --- guard 1: loopback only ------------------------------------------------------------------------------------------
class NonLoopbackConnection(ConnectionRefusedError):
    "Raised (and recorded) when a test tries to connect beyond this machine."

def is_loopback(address) -> bool:
    "Whether a socket address stays on this machine: a unix socket path, localhost, 127.0.0.0/8 or ::1."
    if isinstance(address, (str, bytes)): return True          # AF_UNIX path (or abstract socket)
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes): host = host.decode()
    if not isinstance(host, str): return False
    if host.lower() in ('localhost', 'localhost.localdomain', 'ip6-localhost'): return True
    try: return ipaddress.ip_address(host.split('%')[0]).is_loopback
    except ValueError: return False                             # any other host name: never resolved, never reached

def _resolves_here(host) -> bool:
    "Whether looking `host` up stays on this machine: no host (a local bind), localhost, this machine's name, or an IP literal."
    if host is None or host in ('', b''): return True
    if isinstance(host, bytes): host = host.decode()
    if is_loopback((host, 0)) or host == socket.gethostname(): return True
    try: ipaddress.ip_address(host.split('%')[0]); return True   # a literal address: no query is sent (connect checks it)
    except ValueError: return False

def guard_sockets(mp: pytest.MonkeyPatch, attempts: list):
    """Wrap the socket calls as they are when called (the real ones, or a test's stubs) so that anything beyond this machine
    is recorded in `attempts` and refused before the wrapped call runs: connect, connect_ex, create_connection, getaddrinfo."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create, real_getaddrinfo = socket.create_connection, socket.getaddrinfo
    def refuse(address):
        attempts.append(address)
        raise NonLoopbackConnection(f'test tried to reach {address!r}: tests may reach 127.0.0.1/::1 only')
    def connect(self, address):
        if self.family != getattr(socket, 'AF_UNIX', None) and not is_loopback(address): refuse(address)
        return real_connect(self, address)
    def connect_ex(self, address):
        if self.family != getattr(socket, 'AF_UNIX', None) and not is_loopback(address): refuse(address)
        return real_connect_ex(self, address)
    def create_connection(address, *args, **kwargs):
        if not is_loopback(address): refuse(address)            # before getaddrinfo: no DNS query either
        return real_create(address, *args, **kwargs)
    def getaddrinfo(host, *args, **kwargs):
        if not _resolves_here(host): refuse(host)              # a library resolving a name itself (urllib3 does): no DNS query
        return real_getaddrinfo(host, *args, **kwargs)
    mp.setattr(socket.socket, 'connect', connect); mp.setattr(socket.socket, 'connect_ex', connect_ex)
    mp.setattr(socket, 'create_connection', create_connection); mp.setattr(socket, 'getaddrinfo', getaddrinfo)

@pytest.fixture(autouse=True)
def loopback_only(request):
    "Fail any test that connects (TCP/UDP, by address or host name) or resolves a name beyond this machine."
    attempts = []
    with pytest.MonkeyPatch.context() as mp:
        guard_sockets(mp, attempts)
        yield attempts
    if attempts:
        pytest.fail(f'{request.node.nodeid} tried to connect beyond this machine: {attempts}', pytrace=False)


# --- guard 2: the checkout stays as it was ---------------------------------------------------------------------------
_BYTECODE = ('__pycache__', '.pytest_cache', '.ipynb_checkpoints', '.egg-info')

def _git_status():
    "`git status` lines, ignored files included (data/cache, runs/, reports/ are git-ignored), bytecode excluded."
    try: r = subprocess.run(['git', 'status', '--porcelain', '--ignored', '--untracked-files=all'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError): return None
    if r.returncode != 0: return None
    return {l for l in r.stdout.splitlines() if not any(b in l for b in _BYTECODE)}

def pytest_sessionstart(session):
    session.config._git_status_before = _git_status()

def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, '_git_status_before', None)
    if before is None or hasattr(session.config, 'workerinput'): return   # not a git checkout (or an xdist worker)
    after = _git_status() or set()
    if after != before:
        new, gone = sorted(after - before), sorted(before - after)
        msg = ('the test run changed the checkout (tests must write only into temporary folders):\n'
               + ''.join(f'  now:    {l}\n' for l in new) + ''.join(f'  before: {l}\n' for l in gone))
        session.config.get_terminal_writer().line(msg, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Long end-to-end runs (minutes each on 2 CPU cores) that other tests cover in part: `make test` (CI) skips them,
# `make test-all` (BREAST_CANCER_SLOW_TESTS=1) runs them.
def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: a long end-to-end run; skipped unless BREAST_CANCER_SLOW_TESTS=1 (make test-all)')

def pytest_collection_modifyitems(config, items):
    if os.environ.get('BREAST_CANCER_SLOW_TESTS') == '1': return
    skip = pytest.mark.skip(reason='slow end-to-end run: BREAST_CANCER_SLOW_TESTS=1 (make test-all) runs it')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)
