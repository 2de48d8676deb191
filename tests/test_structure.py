"""The shape of the package (issue 24): the one-way module chain, module size, one home for a run folder's file names,
the config resolved once at the edge, the schema as the one source of allowed values, a fast front door, literate cells."""
import ast, json, re, statistics, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT/'breast_cancer'
# The chain: a module imports only modules before it (../shared/STYLE.md). Nothing imports the CLI.
CHAIN = ['core', 'config', 'rundir', 'io', 'cache', 'data', 'fetch', 'mammo', 'histo', 'fixtures', 'wavelet', 'model',
         'augment', 'twoview', 'distribute', 'tracking', 'train', 'metrics', 'calibrate', 'cascade', 'audit', 'evaluate', 'external', 'explain',
         'report', 'learn', 'protocols', 'speed', 'bench', 'cli']

def modules() -> dict[str, Path]:
    return {p.stem: p for p in PKG.glob('*.py') if p.stem not in ('__init__', '_modidx')}

def imported(path: Path) -> set[str]:
    "The package modules `path` imports anywhere (top level or inside a function)."
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            mod = n.module or ''
            if n.level == 1: out.add(mod.split('.')[0] if mod else None)
            elif mod.startswith('breast_cancer.'): out.add(mod.split('.')[1])
            elif mod == 'breast_cancer': out |= {a.name for a in n.names}
            if n.level == 1 and not mod: out |= {a.name for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name.split('.')[1] for a in n.names if a.name.startswith('breast_cancer.')}
    return {m for m in out if m in modules()}

def test_every_module_is_in_the_chain():
    assert sorted(modules()) == sorted(CHAIN)

@pytest.mark.parametrize('name', CHAIN)
def test_imports_run_one_way(name):
    later = {m for m in imported(modules()[name]) if CHAIN.index(m) >= CHAIN.index(name)}
    assert not later, f'{name} imports {sorted(later)}, which come at or after it in the chain {CHAIN}'

@pytest.mark.parametrize('name', CHAIN)
def test_modules_stay_small(name):
    n = len(modules()[name].read_text().splitlines())
    assert n <= 720, f'breast_cancer/{name}.py has {n} lines: past about 700 a module holds more than one idea; split it'

def _code(name) -> str: return modules()[name].read_text()

def test_no_module_swaps_sys_modules():
    assert not [n for n in CHAIN if 'sys.modules[' in _code(n)]

RUN_FILES = ("'config.yaml'", "'predictions.csv'", "'history.csv'", "'metadata.json'", "'split.csv'", "'done.json'",
             "'cascade.json'", "'oof_predictions.csv'", "'MODEL_CARD.md'")

def test_run_folder_names_live_in_rundir_only():
    found = {(n, f) for n in CHAIN if n != 'rundir' for f in RUN_FILES if f in _code(n)}
    for t in (PKG/'templates').glob('*.ipynb'):
        found |= {(t.name, f) for f in RUN_FILES if f.strip("'") in t.read_text() and f"/{f}" in t.read_text().replace('\\"', "'")}
    assert not found, f'file names of a run folder outside rundir (use RunDir): {sorted(found)}'

EDGES = {'config', 'rundir', 'cli', 'cascade', 'report', 'learn', 'protocols', 'speed', 'bench'}  # where a config may be read (cascade: run_from_config only)

def test_load_config_is_called_at_the_edges_only():
    calls = {n: len(re.findall(r'\bload_config\(', _code(n))) for n in CHAIN if n not in EDGES}
    assert not {n: k for n, k in calls.items() if k}, f'library functions re-resolve their config: {calls}'
    tree = ast.parse(_code('cascade'))
    inside = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              and any(isinstance(c, ast.Call) and getattr(c.func, 'id', '') == 'load_config' for c in ast.walk(f))}
    assert inside <= {'run_from_config'}, f'cascade calls load_config in {sorted(inside)}'

def test_schema_choices_equal_the_owning_modules_constants():
    from breast_cancer.config import choices
    from breast_cancer import model, io, evaluate, wavelet
    assert set(choices('model.head')) == set(model.HEADS)
    assert set(choices('model.backbone')) == set(model.BACKBONES)
    assert set(choices('data.nonfinite')) == set(io.NONFINITE)
    assert set(choices('evaluate.breast_aggregation')) == set(evaluate.AGGREGATIONS)
    assert set(choices('wavelet.method')) == set(wavelet.METHODS)
    assert set(choices('wavelet.mode')) == set(wavelet.MODES)
    assert set(choices('wavelet.at')) == set(wavelet.WAVELET_AT)
    assert set(choices('stain.method')) == set(wavelet.STAIN_METHODS)

def test_wavelet_and_stain_defaults_match_their_classes():
    from breast_cancer.config import load_config
    from breast_cancer.wavelet import WaveletPreprocessor
    c = load_config({'wavelet': {}})
    assert dict(c.wavelet) == WaveletPreprocessor().to_dict()

def test_front_door_is_fast_and_lazy():
    code = ("import sys, breast_cancer; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
            "from breast_cancer import load_config, Cascade, run_from_config, RunDir, evaluate_run; "
            "print(sorted(set(breast_cancer.__all__)))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {'load_config', 'load_dataset', 'patient_split', 'WaveletPreprocessor', 'build_model', 'Cascade',
            'run_from_config', 'evaluate_run', 'run_reports'} <= set(eval(out.stdout))

EXPORT = re.compile(r'^\s*#\|\s*export[si]?\b', re.M)

def _export_cells():
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')) + [ROOT/'nbs'/'fixtures.ipynb']:
        cells = json.loads(nb.read_text())['cells']
        for i, c in enumerate(cells):
            s = ''.join(c['source'])
            if c['cell_type'] != 'code' or not EXPORT.search(s): continue
            body = [l for l in s.splitlines() if l.strip() and not l.strip().startswith('#|')]
            if body and all(l.startswith(('from ', 'import ', ' ', ')')) for l in body): continue  # the import cell
            yield nb.name, i, s, body, cells

def test_one_public_definition_per_export_cell():
    many = []
    for nb, i, s, body, _ in _export_cells():
        tree = ast.parse('\n'.join(l for l in s.splitlines() if not l.strip().startswith('#|')))
        pub = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith('_')]
        if len(pub) > 1: many.append((nb, i, pub))
    assert not many, f'export cells with several public definitions: {many}'

def test_export_cells_are_short():
    sizes = [len(body) for *_, body, _ in _export_cells()]
    assert statistics.median(sizes) <= 10, f'median export cell: {statistics.median(sizes)} lines'
