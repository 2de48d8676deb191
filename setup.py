"""Packaging for breast_cancer, driven by settings.ini (the nbdev 2 layout)."""
import os, shlex
from configparser import ConfigParser
import setuptools

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

for o in 'version description keywords author author_email'.split():
    assert o in cfg, f'missing expected setting: {o}'

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

# A CPU-only machine can ask for the much smaller tensorflow-cpu wheel; Colab keeps its GPU build
# because its preinstalled `tensorflow` already satisfies the default requirement.
tf_dist = os.environ.get('BREAST_CANCER_TF', 'tensorflow').strip() or 'tensorflow'
if tf_dist not in ('tensorflow', 'tensorflow-cpu', 'tensorflow[and-cuda]'):
    raise SystemExit(f"BREAST_CANCER_TF={tf_dist!r}: use 'tensorflow', 'tensorflow-cpu' or 'tensorflow[and-cuda]'")

def _swap_tf(req):
    return req.replace('tensorflow', tf_dist, 1) if req.startswith('tensorflow>=') else req

requirements = [_swap_tf(r) for r in shlex.split(cfg.get('requirements', ''))]
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))
lic = licenses.get(cfg['license'].lower(), (cfg['license'], None))
min_python = cfg['min_python']

setuptools.setup(
    name=cfg['lib_name'],
    version=cfg['version'],
    description=cfg['description'],
    keywords=cfg['keywords'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    license=lic[0],
    classifiers=[
        'Development Status :: ' + statuses[int(cfg['status'])],
        'Intended Audience :: ' + cfg['audience'].title(),
        'Natural Language :: ' + cfg['language'].title(),
        'Topic :: Scientific/Engineering :: Medical Science Apps.',
    ] + ['Programming Language :: Python :: ' + v for v in py_versions[py_versions.index(min_python):]],

    url=cfg['git_url'],
    packages=setuptools.find_packages(include=['breast_cancer', 'breast_cancer.*']),
    include_package_data=True,
    # The presets, report templates, checksum lists, published results and the two bundled samples (~13 MB) travel in the wheel.
    package_data={'breast_cancer': ['templates/*.ipynb', 'configs/*.yaml', 'checksums/*.sha256', 'samples/*/*', 'published_results.yaml', 'measured_learning.yaml', 'measured_protocols.yaml']},
    install_requires=requirements,
    extras_require={'dev': dev_requirements, 'mlflow': ['mlflow>=2.12']},  # tracking: mlflow (optional, never required)
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={
        'console_scripts': cfg.get('console_scripts', '').split(),
        'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
)
