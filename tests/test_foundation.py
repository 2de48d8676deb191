"""The foundation: README and index agree, the bundled sample and its checksums, the CLI entry point."""
import hashlib, json, os, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

def _fenced_commands(md: str) -> list[str]:
    "The shell commands in the first ```sh block after '## Quick start'."
    block = re.search(r'## Quick start.*?```sh\n(.*?)```', md, re.S).group(1)
    return [l.split('#')[0].strip() for l in block.splitlines() if l.split('#')[0].strip()]

def test_readme_quick_start_matches_index(repo_root):
    nb = json.loads((repo_root / 'nbs' / 'index.ipynb').read_text())
    index_md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    readme = (repo_root / 'README.md').read_text()
    assert _fenced_commands(readme) == _fenced_commands(index_md) == ['make reports', 'make test']
    assert readme.index('## Quick start') < readme.index('## What it does')  # the README starts with it

def test_makefile_has_quick_start_targets(repo_root):
    mk = (repo_root / 'Makefile').read_text()
    for target in ('reports:', 'test:'): assert re.search(rf'^{target}', mk, re.M), target

def test_bundled_mias_sample(mias_sample):
    pngs = sorted(mias_sample.glob('mdb*.png'))
    assert len(pngs) == 322
    im = Image.open(pngs[0]); assert im.mode == 'L' and im.size == (256, 256)
    for f in ('Info.txt', 'Licence.txt', 'SOURCE.md'): assert (mias_sample / f).exists(), f
    assert 'Suckling' in (mias_sample / 'SOURCE.md').read_text()

def test_bundled_data_under_20mb(repo_root):
    "data/ plus the samples shipped in the wheel stay small."
    files = [*(repo_root / 'data').rglob('*'), *(repo_root / 'breast_cancer' / 'samples').rglob('*')]
    total = sum(p.stat().st_size for p in files if p.is_file() and 'cache' not in p.parts and 'mini-mias' not in p.parts)
    assert total < 20e6, total

def test_checksums_cover_all_images(repo_root):
    lines = (repo_root / 'data' / 'checksums' / 'mias.sha256').read_text().split('\n')
    entries = dict(reversed(l.split('  ')) for l in lines if l)
    assert len(entries) == 322 and all(re.fullmatch(r'[0-9a-f]{64}', h) for h in entries.values())
    assert entries['mdb001.pgm'] == '16c5e6c2ac59e62b96e56cbbcba82fba297d7f838c43e8ccd4e127116bee0b35'

def test_checksums_match_original_pgms(repo_root, shared_data):
    entries = dict(reversed(l.split('  ')) for l in (repo_root / 'data/checksums/mias.sha256').read_text().split('\n') if l)
    for pgm in sorted((shared_data / 'mini-mias' / 'pgm_samples').glob('*.pgm')):
        assert entries[pgm.name] == hashlib.sha256(pgm.read_bytes()).hexdigest(), pgm
    # and the header + raw pixels rule holds for an image we only have as PNG
    px = np.asarray(Image.open(shared_data / 'mini-mias' / 'mdb100.png'))
    assert entries['mdb100.pgm'] == hashlib.sha256(b'P5\n1024 1024\n255\n' + px.tobytes()).hexdigest()

def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, '-m', 'breast_cancer.cli', '--help'], capture_output=True, text=True)
    exe = Path(sys.executable).parent / 'breast-cancer'
    if exe.exists(): out = subprocess.run([str(exe), '--help'], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import argparse
    from breast_cancer.cli import build_parser
    expected = {'download', 'prepare', 'train', 'evaluate', 'report', 'predict', 'bench'}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert expected <= set(sub.choices), sorted(sub.choices)            # the parser's own subcommand list
    listed = set(re.findall(r'^ {4}(\w[\w-]*) ', out.stdout, re.M))    # the subcommand lines of the printed help
    assert expected <= listed and listed <= set(sub.choices), (sorted(listed), out.stdout)


def _socket_recorders(mp, reached: list):
    "Stand-ins for the real socket calls, which record what reaches them and never dial: under them nothing leaves the machine."
    import socket
    def recorder(name, result=None, address_at=0):
        def call(*args, **kwargs):
            reached.append((name, args[address_at])); return result
        return call
    mp.setattr(socket.socket, 'connect', recorder('connect', None, 1)); mp.setattr(socket.socket, 'connect_ex', recorder('connect_ex', 0, 1))
    mp.setattr(socket, 'create_connection', recorder('create_connection')); mp.setattr(socket, 'getaddrinfo', recorder('getaddrinfo', []))

def test_loopback_guard_refuses_other_addresses():
    """The suite's guard (conftest.guard_sockets) laid over recorders that stand in for the real socket calls: other hosts are
    refused before the real call is reached, loopback passes through. The addresses beyond this machine are documentation
    ones and only ever reach the recorders, so even with the guard removed this test sends no packet and no DNS query."""
    import socket
    from conftest import NonLoopbackConnection, guard_sockets
    with pytest.MonkeyPatch.context() as mp:
        reached = []                      # what got past the guard, to the (stand-in) real calls
        _socket_recorders(mp, reached)
        v4, v6, name = ('192.0.2.1', 9), ('2001:db8::1', 9), ('example.invalid', 443)   # TEST-NET-1, IPv6 documentation prefix, a name that never resolves (RFC 2606)
        socket.create_connection(v4)                          # first, the stand-ins alone: they record, nothing is dialled
        assert reached == [('create_connection', v4)]; reached.clear()
        refused = []
        guard_sockets(mp, refused)        # the guard as the autouse fixture lays it, here over the recorders
        with socket.socket() as s4, socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
            for call, address in ((socket.create_connection, v4), (socket.create_connection, name), (s4.connect, v4),
                                  (s4.connect_ex, name), (s6.connect, v6), (lambda a: socket.getaddrinfo(*a), name)):
                with pytest.raises(NonLoopbackConnection): call(address)
            assert reached == [], reached                        # refused before the real call
            assert refused == [v4, name, v4, name, v6, name[0]]
            socket.create_connection(('127.0.0.1', 9)); s4.connect(('localhost', 9)); s6.connect_ex(('::1', 9))
            socket.getaddrinfo('localhost', 9); socket.getaddrinfo('127.0.0.1', 9); socket.getaddrinfo(None, 9)
        assert reached == [('create_connection', ('127.0.0.1', 9)), ('connect', ('localhost', 9)), ('connect_ex', ('::1', 9)),
                           ('getaddrinfo', 'localhost'), ('getaddrinfo', '127.0.0.1'), ('getaddrinfo', None)]
        assert len(refused) == 6                                 # loopback was not refused

def test_loopback_guard_lets_a_real_local_connection_through(loopback_only):
    "The guard over the real socket calls: a server on 127.0.0.1 is reached by address and by the name localhost."
    import socket
    with socket.socket() as server:
        server.bind(('127.0.0.1', 0)); server.listen(2)
        socket.create_connection(server.getsockname(), timeout=2).close()
        with socket.socket() as c: c.connect(('localhost', server.getsockname()[1]))
    assert loopback_only == []

def test_suite_collects_with_stdin_closed(repo_root):
    "CI runs with no standard input: collecting a module that imports keras (which imports IPython) must still work."
    res = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_cascade.py'],
                         cwd=repo_root, capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.close(0))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert 'test_thresholds_never_see_test_rows' in res.stdout
