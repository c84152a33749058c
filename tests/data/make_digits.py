"""Write sdtool/data/digits.npz, the `digits` data set shipped in the package, from scikit-learn's copy.

sdtool reads the 1797 8x8 digits from this file so that it does not depend on scikit-learn. The arrays
are exactly scikit-learn's `load_digits()`: `images` (1797, 8, 8) uint8 in 0..16 and `target` (1797,)
uint8 in 0..9, in the same order (tests/test_data.py compares them with scikit-learn when it is
installed). The data is the UCI "Optical Recognition of Handwritten Digits" test set, CC BY 4.0; see
sdtool/data/DIGITS_LICENSE.txt. Run it only if the file is lost (needs `pip install scikit-learn`):

    python tests/data/make_digits.py

np.savez_compressed stores a zip time stamp, so a rerun changes the file's bytes but not its arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[2] / "sdtool" / "data" / "digits.npz"


def main() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)
    target = d.target.astype(np.uint8)
    # The narrowing must be lossless: whole numbers 0..16 and labels 0..9 survive the cast unchanged.
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)
    assert images.shape == (1797, 8, 8) and int(images.max()) == 16 and int(target.max()) == 9
    np.savez_compressed(OUT, images=images, target=target)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
