"""Synthetic landmarks: the project's embedded default data set.

Procedurally rendered "landmarks" (facades with floors of windows, textures, roofs, towers
and features drawn from one shared vocabulary), each seen in many views that vary
viewpoint (perspective), scale, crop, illumination/colour, blur, occlusion and clutter.
:func:`generate` writes, under ``out_dir``::

    gldv2/train.csv                      id,url,landmark_id (16-hex ids, empty url)
    gldv2/train_clean.csv                landmark_id,images (space-separated ids; no junk views)
    gldv2/train/<a>/<b>/<c>/<id>.jpg     GLDv2 layout (a, b, c = first three id characters)
    revisited/<name>/gnd_<name>.pkl      {"imlist", "qimlist", "gnd": [{"bbx", "easy", "hard", "junk"}]}
    revisited/<name>/jpg/<imname>.jpg    queries (b###_query#) and database images
    revisitop1m/revisitop1m.txt          only when r1m_distractors > 0: "<hh>/<id>.jpg" lines,
    revisitop1m/jpg/<hh>/<id>.jpg        images at revisitop1m/jpg/<line>
    summary.json                         configuration, counts, paths (written before the marker)
    .complete                            written last

Benchmark landmarks (and its distractor landmarks) come from generator seeds disjoint from
the training landmarks'. Output is byte-identical for a given seed and configuration,
whatever the number of workers. Command line: ``python -m sg_train.synthetic --out DIR``.
"""
from .pipeline import MARKER, OutputDirError, generate

__all__ = ["generate", "OutputDirError", "MARKER"]
