"""Which wheels the lent GPU machine needs: the dependency tree of ``roots`` as installed here, less the image's
packages (``device_image_packages.txt``) and anything named with ``--minus`` (with its own tree), as pinned
requirements for ``pip download``. benchmarks/device_kit.sh calls it, so a dependency that a new version of
Snakemake or datasets brings is carried without anyone listing it.

Markers are read for the device's Python (``--python-version``, 3.12 by default) and no extras; ``--drop`` leaves
out a package and what only it needs (PuLP: the solver of Snakemake's ILP scheduler, 16 MB, while the device runs
the greedy one).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

IMAGE_PACKAGES = Path(__file__).with_name("device_image_packages.txt")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return {normalize(line) for line in lines if line and not line.startswith("#")}


def dependency_tree(roots: list[str], python_version: str = "3.12", stop: set[str] = frozenset()) -> dict[str, str]:
    """Every installed distribution reachable from ``roots`` (name -> version), not walking past ``stop``."""
    environment = {**default_environment(), "python_version": python_version, "extra": ""}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--minus", nargs="*", default=[], help="carried in another part: leave out with their tree")
    parser.add_argument("--drop", nargs="*", default=[], help="leave out, with what only they need")
    parser.add_argument("--deps-only", action="store_true", help="leave out the roots themselves")
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args()
    wheels = wheels_to_carry(args.roots, args.minus, args.drop, args.python_version, deps_only=args.deps_only)
    print(" ".join(f"{name}=={version}" for name, version in wheels.items()))


if __name__ == "__main__":
    main()
