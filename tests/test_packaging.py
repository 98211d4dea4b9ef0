"""What `pip install` puts on sys.path: the library only, no global `callbacks`/`datamodules` names."""
from importlib.metadata import packages_distributions


def test_installed_top_level_names_are_only_sg_train():
    claimed = sorted(name for name, dists in packages_distributions().items() if "sg-train" in dists)
    assert claimed == ["sg_train"]
