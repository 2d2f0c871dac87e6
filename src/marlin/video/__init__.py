"""Video in, features out: the one video reader / writer (:mod:`marlin.video.io`), the official window rule
(:mod:`marlin.video.windows`), the decode -> crop -> encode pipeline of one video (:mod:`marlin.video.pipeline`) and
batch extraction for datasets (:mod:`marlin.video.extract`)."""
