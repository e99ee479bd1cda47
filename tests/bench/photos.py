"""Real photographs for the main job's tests: the ones scikit-image ships in its package
(no download), copied as PNG and JPEG, colour and grey."""
import shutil
from pathlib import Path

import pytest

# colour PNGs, a grey PNG, colour and grey-ish JPEGs
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg",
          "hubble_deep_field.jpg")


def copy_photos(folder: Path) -> list[str]:
    data = pytest.importorskip("skimage.data")
    source = Path(data.__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        shutil.copy(source / name, folder / name)
    return sorted(PHOTOS)
