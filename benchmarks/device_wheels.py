"""Which wheels the lent GPU machine needs: the dependency tree of ``roots`` as installed here, less the image's
packages (``device_image_packages.txt``) and anything named with ``--minus`` (with its own tree), as pinned
requirements for ``pip download``. benchmarks/device_kit.sh calls it, so a dependency that a new version of
Snakemake or datasets brings is carried without anyone listing it.

Markers are read for the device's Python (``--python-version``, 3.12 by default) and no extras; ``--drop`` leaves
out a package and what only it needs (PuLP: the solver of Snakemake's ILP scheduler, 16 MB, while the device runs
the greedy one).

The kit installs the wheels with ``--no-deps`` (nothing can be fetched there), so pip would not notice a carried
wheel that needs another version of a package the image has: ``--check DIR ...`` does, for the image versions the
device notes give (``name==version`` lines), before a lease is spent on it. ``--install-image-versions`` puts those
versions into the running venv where this Python can take them (``make test-image-versions``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

IMAGE_PACKAGES = Path(__file__).with_name("device_image_packages.txt")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_listing(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """The image's packages: name -> version where the device notes give one, else None."""
    listing: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            listing[normalize(name)] = version.strip() or None
    return listing


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    return set(image_listing(path))


def image_versions(path: Path = IMAGE_PACKAGES) -> dict[str, str]:
    return {name: version for name, version in image_listing(path).items() if version}


def marker_environment(python_version: str) -> dict[str, str]:
    """Markers as the device's Python reads them, with no extras."""
    full = python_version if python_version.count(".") >= 2 else f"{python_version}.0"
    return {**default_environment(), "python_version": ".".join(full.split(".")[:2]), "python_full_version": full,
            "extra": ""}


def dependency_tree(roots: list[str], python_version: str = "3.12", stop: set[str] = frozenset()) -> dict[str, str]:
    """Every installed distribution reachable from ``roots`` (name -> version), not walking past ``stop``."""
    environment = marker_environment(python_version)
    versions: dict[str, str] = {}
    pending = [normalize(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in versions or name in stop:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError as missing:
            raise SystemExit(f"device_wheels: {name} is needed but not installed here; run `make setup` first") \
                from missing
        versions[name] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(normalize(requirement.name))
    return versions


def wheels_to_carry(roots: list[str], minus: list[str] = (), drop: list[str] = (), python_version: str = "3.12",
                    image: set[str] | None = None, deps_only: bool = False) -> dict[str, str]:
    """The tree of ``roots`` less the image's packages, the tree of ``minus`` and ``drop`` (name -> version);
    ``deps_only`` leaves out the roots themselves (lora-bench: the checkout is on the device)."""
    image = image_packages() if image is None else image
    dropped = {normalize(name) for name in drop}
    # Stop at the image's packages: their versions there come with what they need, which the (maybe newer)
    # versions installed here may not share.
    root_names = {normalize(root) for root in roots}
    stop = dropped | (image - root_names)
    tree = dependency_tree(roots, python_version, stop=stop)
    left_out = image | (set(dependency_tree(list(minus), python_version, stop=stop)) if minus else set()) \
        | (root_names if deps_only else set())
    return {name: version for name, version in sorted(tree.items()) if name not in left_out}


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata_name).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def unmet_requirements(requirements: dict[str, list[Requirement]], versions: dict[str, str],
                       python_version: str = "3.12") -> list[str]:
    """Each requirement (of a carried wheel, or of lora-bench itself: name -> its requirements) that the image's
    version of a package does not meet, worded; packages whose version on the image is not known are not judged."""
    environment = marker_environment(python_version)
    unmet = []
    for needer, needs in sorted(requirements.items()):
        for requirement in needs:
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            version = versions.get(normalize(requirement.name))
            if version is not None and not requirement.specifier.contains(Version(version), prereleases=True):
                unmet.append(f"{needer} needs {requirement.name}{requirement.specifier}; the image has {version}")
    return unmet


# PyPI's torch for Linux is the CUDA build (with its CUDA libraries, about 3 GB; it runs on a CPU too): only on
# request (--with-torch) does it replace the local CPU build `make setup` installs.
HEAVY = {"torch": "PyPI's Linux torch is the CUDA build (about 3 GB): --with-torch (IMAGE_TORCH=1) installs it"}


def install_image_versions(versions: dict[str, str] | None = None, heavy: bool = False) -> list[tuple[str, str, str]]:
    """Installs, into the running Python's environment, the image's version of each package installed there
    (one pip call each, so one that this Python cannot take does not stop the rest; ``heavy``: torch too), and
    returns (name, image version, outcome) for each."""
    versions = image_versions() if versions is None else versions
    outcomes = []
    for name, version in sorted(versions.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.split("+")[0] != version:
            if name in HEAVY and not heavy:
                outcomes.append((name, version, f"kept at {installed}: {HEAVY[name]}"))
                continue
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                   f"{name}=={version}"], capture_output=True, text=True)
            if done.returncode != 0:
                python = ".".join(map(str, sys.version_info[:2]))
                outcomes.append((name, version, f"kept at {installed}: pip found no {version} for Python {python}"))
                continue
        outcomes.append((name, version, "as on the image"))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*")
    parser.add_argument("--minus", nargs="*", default=[], help="carried in another part: leave out with their tree")
    parser.add_argument("--drop", nargs="*", default=[], help="leave out, with what only they need")
    parser.add_argument("--deps-only", action="store_true", help="leave out the roots themselves")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--check", nargs="+", type=Path, metavar="DIR",
                        help="instead: check the wheels in DIR against the image's versions; exit 1 if one is unmet")
    parser.add_argument("--install-image-versions", action="store_true",
                        help="instead: install the image's versions into this environment where possible")
    parser.add_argument("--with-torch", action="store_true",
                        help="with --install-image-versions: the image's torch too (PyPI's CUDA build, about 3 GB)")
    args = parser.parse_args()
    if args.check:
        # lora-bench itself runs from the checkout there, so its own requirements are checked too, but for its
        # torch pin: that names the local CPU build, and the device runs the image's CUDA torch by design.
        own = [Requirement(text) for text in metadata.requires("lora-bench") or []]
        requirements = {"lora-bench": [requirement for requirement in own if normalize(requirement.name) != "torch"]}
        requirements |= {wheel.name: wheel_requirements(wheel)
                         for folder in args.check for wheel in folder.glob("*.whl")}
        unmet = unmet_requirements(requirements, image_versions(), args.python_version)
        for line in unmet:
            print(f"device_wheels: {line}", file=sys.stderr)
        sys.exit(1 if unmet else 0)
    if args.install_image_versions:
        for name, version, outcome in install_image_versions(heavy=args.with_torch):
            print(f"{name:<24} image {version:<12} {outcome}")
        return
    if not args.roots:
        parser.error("name the roots whose wheels to carry (or --check / --install-image-versions)")
    wheels = wheels_to_carry(args.roots, args.minus, args.drop, args.python_version, deps_only=args.deps_only)
    print(" ".join(f"{name}=={version}" for name, version in wheels.items()))


if __name__ == "__main__":
    main()
