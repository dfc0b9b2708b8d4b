"""The openly licensed photos that train and test the shipped demo VAE: a data table plus loaders.

Two sources: images bundled in scikit-image's wheel (`skimage.data`, no network), and photos
from four Debian wallpaper packages, fetched with `apt-get download` and unpacked with
`dpkg-deb -x` into a data folder (never committed). Not a data pipeline.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class SampleImage:
    name: str  # the skimage.data function that returns it
    split: str  # "train" or "test" (held out from training)
    licence: str  # as stated in the skimage.data docstring
    source: str  # where skimage took it from, per the same docstring
    max_side: int = 0  # downscale (Lanczos) so the longer side is at most this; 0 keeps it
    package: str = ""  # Debian package holding the file; "" for skimage.data
    path: str = ""  # path of the file inside that package


# Debian bookworm packages the photos come from, pinned (apt-get download PKG=VERSION).
DEBIAN_PACKAGES: Dict[str, str] = {"mate-backgrounds": "1.26.0-1", "lomiri-wallpapers-20.04": "20.04.0-2",
                                   "lomiri-wallpapers-16.04": "20.04.0-2",
                                   "plasma-workspace-wallpapers": "4:5.27.5-2"}
# Where the packages are unpacked: $AKL_TRAIN_DATA, else outputs/train_data (git-ignored).
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "outputs" / "train_data"

_MATE = "/usr/share/backgrounds/mate/"
_MATE_SRC = "Debian mate-backgrounds 1.26.0-1 (https://git.mate-desktop.org/mate-backgrounds/), "
_LOMIRI_SRC = ("Debian lomiri-wallpapers-20.04 20.04.0-2 "
               "(https://gitlab.com/ubports/development/core/lomiri-wallpapers), ")


def _mate(name, split, holder, sub="nature", max_side=1024):
    return SampleImage(f"mate-{name.lower()}", split, f"GPL-2+ (copyright {holder}, per debian/copyright)",
                       _MATE_SRC + f"{sub}/{name}.jpg", max_side, "mate-backgrounds", f"{_MATE}{sub}/{name}.jpg")


_LOMIRI16_SRC = ("Debian lomiri-wallpapers-16.04 20.04.0-2 "
                 "(https://gitlab.com/ubports/development/core/lomiri-wallpapers), ")


def _lomiri16(file, licence, holder, split="train", max_side=1024):
    """A photo of the Ubuntu Touch 16.04 set; licence and holder as its debian/copyright states them."""
    name = "lomiri16-" + file.split("_by_")[0].lower().replace("_", "-")
    return SampleImage(name, split, f"{licence} (copyright {holder}, per debian/copyright)",
                       _LOMIRI16_SRC + f"16.04/{file}", max_side, "lomiri-wallpapers-16.04",
                       f"/usr/share/backgrounds/{file}")


_PLASMA_SRC = "Debian plasma-workspace-wallpapers 4:5.27.5-2 (https://invent.kde.org/plasma/plasma-workspace-wallpapers), "


def _plasma(name, author, max_side=1024):
    """A photo of KDE Plasma 5.27's set. Each wallpaper's metadata names its author and licence
    (LGPLv3 for these); debian/copyright covers the package as GPL-2+ (2014 KDE Visual Design Group)."""
    return SampleImage(f"plasma-{name.lower()}", "train",
                       f"LGPL-3 (author {author}, per the wallpaper's metadata; package: GPL-2+, KDE Visual Design "
                       "Group, per debian/copyright)", _PLASMA_SRC + f"{name}/contents/images/2560x1600.jpg",
                       max_side, "plasma-workspace-wallpapers",
                       f"/usr/share/wallpapers/{name}/contents/images/2560x1600.jpg")


def _lomiri(name, file, split, holder, max_side=1024):
    return SampleImage(f"lomiri-{name}", split, f"CC-BY-SA-3.0 (copyright {holder}, per debian/copyright)",
                       _LOMIRI_SRC + f"20.04/{file}", max_side, "lomiri-wallpapers-20.04",
                       f"/usr/share/backgrounds/{file}")


# Licences and sources are quoted from the docstrings of scikit-image 0.26.0 `skimage.data`.
# Held out: chelsea and coffee, two colour photos whose subjects (fur, porcelain, wood grain)
# appear in no training image. Grey images train texture and edges; they are fed as RGB.
IMAGES: Tuple[SampleImage, ...] = (
    SampleImage("astronaut", "train", "public domain (no known copyright restrictions)",
                "NASA Great Images database, https://flic.kr/p/r9qvLn"),
    SampleImage("rocket", "train", "public domain (released by SpaceX)",
                "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820/"),
    SampleImage("hubble_deep_field", "train", "public domain (NASA media guidelines)",
                "HubbleSite, http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/"),
    SampleImage("immunohistochemistry", "train", "no known copyright restrictions",
                "Center for Microscopy And Molecular Imaging (CMMI)"),
    SampleImage("retina", "train", "CC0 1.0",
                "Wikimedia Commons, File:Fundus_photograph_of_normal_left_eye.jpg (Mikael Haggstrom)",
                max_side=512),
    SampleImage("camera", "train", "CC0 (photographer Lav Varshney)", "scikit-image"),
    SampleImage("coins", "train", "no known copyright restrictions",
                "Brooklyn Museum Collection, https://www.brooklynmuseum.org/opencollection/archives/image/51611"),
    SampleImage("brick", "train", "CC0", "CC0Textures, https://cc0textures.com/view.php?tex=Bricks25"),
    SampleImage("grass", "train", "CC0", "DeviantArt, https://www.deviantart.com/linolafett/art/Grass-01-434853879"),
    SampleImage("gravel", "train", "CC0", "CC0Textures, https://cc0textures.com/view.php?tex=Gravel04"),
    # Debian photos: training ones at most 1024 px on the longer side, held-out ones 512 px.
    _mate("Aqua", "train", "2008 Charles Barbin"),
    _mate("Blinds", "train", "2008 Lennart Poettering, Andrea Cimitan"),
    _mate("FreshFlower", "train", "2005 Jens Ansorg"),
    _mate("Garden", "train", "2008 Charles Barbin"),
    _mate("GreenMeadow", "train", "2005 Timothy Schellhase, 2008 Lapo Calamandrei"),
    _mate("RainDrops", "train", "2008 blackcombwhistler07"),
    _mate("Storm", "train", "2008 Sergey Nazarov"),
    _mate("TwoWings", "train", "2008 Charles Barbin, Hylke Bons"),
    _mate("Wood", "train", "2008 Jean-Francois Fortin Tam"),
    _mate("YellowFlower", "train", "2008 Charles Barbin"),
    _mate("Elephants", "train", "2020 Wyng Stancikaite", sub="abstract"),
    _lomiri("kleiber", "Kleiber_by_Lukas_Baubkus.jpg", "train", "2021 Lukas Baubkus"),
    _lomiri("infinite-sea", "Infinite-Sea_by_Aury88.jpg", "train", "2019 Aury88"),
    _lomiri("painting-colors", "Painting-Colors_by__herobrine7gamer.jpg", "train", "2021 HEROBRINE7GAMER"),
    # the Ubuntu Touch 16.04 photos, added for the third demo model (more varied subjects)
    _lomiri16("aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "2018 Aitzol Berasategi"),
    _lomiri16("analogpattern_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "2018 Peter Nerlich"),
    _lomiri16("Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0", "2018 Sander Klootwijk"),
    _lomiri16("Dragonfly_by_Bolly.jpg", "CC-BY-SA-4.0", '2018 "Bolly"'),
    _lomiri16("free_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "2018 Peter Nerlich"),
    _lomiri16("friends_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "2018 Aitzol Berasategi"),
    _lomiri16("greentock_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "2018 Peter Nerlich"),
    _lomiri16("life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "2018 Aitzol Berasategi"),
    _lomiri16("picosdeeuropa_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "2018 Aitzol Berasategi"),
    _lomiri16("Picture_0B_by_freespace.jpg", "CC-BY-4.0", '2018 Trevor "Freespace"'),
    _lomiri16("Picture_1A_by_freespace.jpg", "CC-BY-4.0", '2018 Trevor "Freespace"'),
    _lomiri16("seeding_by_Clements_Engelhardt.jpg", "CC0-1.0", "2018 Clemens Engelhardt"),
    _lomiri16("sunset_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "2018 Aitzol Berasategi"),
    _lomiri16("umang_by_Abhishek_Mudgal.jpg", "CC-BY-4.0", "2018 Abhishek Mudgal"),
    _lomiri16("Wine_by_Jakkub_Mede.jpg", "CC-BY-4.0", "2018 Jakub Mede"),
    # KDE Plasma's photos (the set's illustrations are left out), added for the fourth demo model:
    # warm autumn colours, water, mist, forest, sky and architecture
    _plasma("BytheWater", "Maciej Wiklo"),
    _plasma("ColdRipple", "Risto Saukonpää"),
    _plasma("ColorfulCups", "Dmitri Popov"),
    _plasma("DarkestHour", "Risto Saukonpää"),
    _plasma("EveningGlow", "Ian Hex"),
    _plasma("FallenLeaf", "Martin Klapetek"),
    _plasma("Grey", "Sigi Sagi"),
    _plasma("Kite", "Risto Saukonpää"),
    _plasma("OneStandsOut", "Risto Saukonpää"),
    _plasma("Path", "Risto Saukonpää"),
    _plasma("summer_1am", "Risto Saukonpää"),
    _mate("LadyBird", "test", "2008 Charles Barbin", max_side=512),
    _mate("Dune", "test", "2007 Marco Cogoni, 2008 Hylke Bons", max_side=512),
    SampleImage("chelsea", "test", "CC0 (photographer Stefan van der Walt)", "scikit-image"),
    SampleImage("coffee", "test", "CC0 (photographer Rachel Michetti; courtesy of Pikolo Espresso Bar)",
                "scikit-image"),
)

BY_NAME: Dict[str, SampleImage] = {im.name: im for im in IMAGES}


def data_dir() -> Path:
    return Path(os.environ.get("AKL_TRAIN_DATA") or DEFAULT_DATA_DIR)


def fetch_debian(root: Optional[Path] = None, split: Optional[str] = None) -> Path:
    """Download (apt-get download, pinned) and unpack (dpkg-deb -x) the Debian packages into
    ROOT/<package>/ unless already there; returns ROOT. Needs apt and a Debian mirror. With
    `split`, only the packages that hold that split's photos (tests need only "test": one
    package, 47 MB, instead of all four, 168 MB)."""
    root = Path(root or data_dir())
    root.mkdir(parents=True, exist_ok=True)
    wanted = {im.package for im in IMAGES if im.package and (split is None or im.split == split)}
    for pkg, version in DEBIAN_PACKAGES.items():
        if pkg not in wanted:
            continue
        if (root / pkg / "usr" / "share" / "doc" / pkg / "copyright").is_file():
            continue
        debs = sorted(root.glob(f"{pkg}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=root, check=True)
            debs = sorted(root.glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root / pkg)], check=True)
    return root


def available(name: str) -> bool:
    """Whether the named image can be loaded here (Debian photos need fetch_debian first)."""
    info = BY_NAME[name]
    return not info.package or (data_dir() / info.package / info.path.lstrip("/")).is_file()


def load_rgb(name: str) -> np.ndarray:
    """The named image as (H, W, 3) uint8 RGB; grey images are repeated to three channels."""
    from PIL import Image

    info = BY_NAME[name]
    if info.package:
        file = data_dir() / info.package / info.path.lstrip("/")
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: run scripts/train_small_vae.py --fetch-data (or "
                                    f"images.fetch_debian()) to unpack Debian {info.package} there, or set "
                                    f"AKL_TRAIN_DATA to the folder that holds it")
        with Image.open(file) as im:
            arr = np.asarray(im.convert("RGB"))
    else:
        import skimage.data

        arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}() returned {arr.dtype}, expected uint8")
    if info.max_side:
        arr = fit_longer_side(arr, info.max_side)
    return np.ascontiguousarray(arr)


def names(split: str, debian: bool = True) -> List[str]:
    """Names in `split` ("train"/"test"); debian=False keeps only the skimage.data ones."""
    return [im.name for im in IMAGES if im.split == split and (debian or not im.package)]


def fit_longer_side(arr: np.ndarray, side: int) -> np.ndarray:
    """`arr` (H, W, 3) uint8 shrunk (Lanczos) so its longer side is `side`; a smaller image is kept
    as it is (never upscaled, which would smooth it)."""
    from PIL import Image

    h, w = arr.shape[:2]
    if max(h, w) <= side:
        return arr
    s = side / max(h, w)
    return np.asarray(Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.LANCZOS))


def center_crop_multiple(arr: np.ndarray, multiple: int = 8) -> np.ndarray:
    """Centre crop (H, W, ...) so both sides are multiples of `multiple` (the VAE's downscale factor)."""
    h, w = arr.shape[:2]
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return arr[top : top + nh, left : left + nw]


if __name__ == "__main__":
    # `python scripts/images.py --fetch-debian`: unpack the pinned Debian photo packages (the demo
    # model's training photos and two of its held-out photos) into data_dir(), as --fetch-data does.
    import sys

    args = sys.argv[1:]
    if args not in (["--fetch-debian"], ["--fetch-debian", "--heldout"]):
        raise SystemExit("usage: python scripts/images.py --fetch-debian [--heldout]   (--heldout: only the "
                         "held-out photos' packages)")
    print(f"[images] Debian photos in {fetch_debian(split='test' if '--heldout' in args else None)}")
