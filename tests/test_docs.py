"""The design document is in the repository and every reference to it points at a real section."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_design_reference_names_an_existing_section():
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "design.md").read_text(), flags=re.M))
    sources = [p for folder in ("sg_train", "datamodules", "callbacks", "tests", "bench") for p in (ROOT / folder).rglob("*.py")]
    sources += [ROOT / "train.py", ROOT / "evaluate.py", ROOT / "README.md"]
    cited = {(p.relative_to(ROOT).as_posix(), n) for p in sources
             for ref in re.findall(r"design\.md (§\d+(?:, §\d+)*)", p.read_text()) for n in re.findall(r"\d+", ref)}
    assert len(cited) >= 10
    assert not [(f, n) for f, n in cited if n not in sections]
    outside = "DESIGN" + ".md"  # the project notes that are not in the repository
    assert not [p for p in sources if outside in p.read_text()]


def test_every_file_the_readme_and_design_link_to_is_in_the_repository():
    """Markdown links and pictures with a relative target (``[x](docs/y.md)``, ``![x](docs/images/y.png)``)."""
    missing = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "design.md"):
        prose = re.sub(r"`[^`\n]*`", "", doc.read_text())  # code spans are not links
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append((doc.name, target))
    assert not missing
