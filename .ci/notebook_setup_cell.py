"""Give notebooks the Colab setup cell, the "Open in Colab" badge and a closing export cell that runs anywhere.

Usage: python .ci/notebook_setup_cell.py nbs/06a_explain.ipynb [...]   (then `nbdev_clean`)
tests/test_install.py checks that every notebook in nbs/ has them.
"""
import json, re, sys
from pathlib import Path

SETUP = """#| hide
# Setup (Colab, or any fresh Python): install the package, and nbdev for the documentation cells, only when missing.
import importlib.util, subprocess, sys
_need = {'breast_cancer': ['breast_cancer @ git+https://github.com/breast-cancer-toolkit/breast_cancer'],
         'nbdev': ['nbdev==2.4.14', 'execnb==0.1.18', 'fastcore>=1.12,<2']}  # the versions the notebooks are tested with
_need = [spec for module, specs in _need.items() if importlib.util.find_spec(module) is None for spec in specs]
if _need: subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', *_need], check=True)
from breast_cancer.core import setup_runtime
setup_runtime();"""
EXPORT = ("#| hide\nimport nbdev\n"
          "if nbdev.config.is_nbdev(): nbdev.nbdev_export()  # in a clone; a notebook opened alone (Colab) has nothing to export")
COLAB = 'https://colab.research.google.com'

def _lines(s):
    ls = s.split('\n'); return [l + '\n' for l in ls[:-1]] + [ls[-1]]

def _cell(kind, s):
    c = {'cell_type': kind, 'metadata': {}, 'source': _lines(s)}
    return {**c, 'execution_count': None, 'outputs': []} if kind == 'code' else c

def apply(path: Path):
    nb = json.loads(path.read_text()); cells = nb['cells']
    text = lambda c: ''.join(c['source'])
    cells[:] = [c for c in cells if not (c['cell_type'] == 'code' and text(c).startswith('#| hide\n# Setup (Colab'))]
    cells.insert(1, _cell('code', SETUP))
    if not any('colab-badge.svg' in text(c) for c in cells):
        rel = path.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
        badge = (f'[![Open In Colab]({COLAB}/assets/colab-badge.svg)]'
                 f'({COLAB}/github/breast-cancer-toolkit/breast_cancer/blob/main/{rel})')
        cells.insert(3 if len(cells) > 2 and text(cells[2]).startswith('#| default_exp') else 2, _cell('markdown', badge))
    for c in cells:
        if c['cell_type'] == 'code' and re.fullmatch(r'#\| hide\nimport nbdev; nbdev\.nbdev_export\(\)\s*', text(c)):
            c['source'] = _lines(EXPORT)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

if __name__ == '__main__':
    for p in sys.argv[1:]: apply(Path(p))
