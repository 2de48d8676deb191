"""Derive the bundled `breast_cancer/samples/mini-mias-256/` sample and `mias.sha256` (in `data/checksums/` and
`breast_cancer/checksums/`) from the full mini-MIAS.

Usage: python data/derive_mias_256.py ../shared/data/mini-mias

- Each 1024x1024 8-bit image is downscaled to 256x256 with Pillow's anti-aliased LANCZOS filter
  and saved as lossless 8-bit PNG.
- The SHA-256 of each *original* `mdbNNN.pgm` is rebuilt from the lossless PNG: an original PGM is the
  17 header bytes `P5\\n1024 1024\\n255\\n` followed by the raw pixel bytes.
"""
import hashlib, shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image

PGM_HEADER = b'P5\n1024 1024\n255\n'

def pgm_sha256(pixels: np.ndarray) -> str:
    return hashlib.sha256(PGM_HEADER + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()

def main(src: Path, dest: Path = Path(__file__).parent):
    out = dest.parent / 'breast_cancer' / 'samples' / 'mini-mias-256'; out.mkdir(parents=True, exist_ok=True)
    lines = []
    for png in sorted(src.glob('mdb*.png')):
        im = Image.open(png); assert im.mode == 'L' and im.size == (1024, 1024), png
        lines.append(f'{pgm_sha256(np.asarray(im))}  {png.stem}.pgm')
        im.resize((256, 256), Image.Resampling.LANCZOS).save(out / png.name, optimize=True)
    for pgm in sorted((src / 'pgm_samples').glob('*.pgm')):  # check the method on the untouched originals
        want = hashlib.sha256(pgm.read_bytes()).hexdigest()
        assert f'{want}  {pgm.name}' in lines, f'checksum method disagrees with {pgm}'
    for d in (dest / 'checksums', dest.parent / 'breast_cancer' / 'checksums'):
        d.mkdir(exist_ok=True); (d / 'mias.sha256').write_text('\n'.join(lines) + '\n')
    for f in ('Info.txt', 'Licence.txt', 'README'): shutil.copy(src / f, out / f)
    print(f'{len(lines)} images -> {out}')

if __name__ == '__main__': main(Path(sys.argv[1]))
