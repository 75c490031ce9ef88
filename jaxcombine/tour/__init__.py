"""``jaxcombine tour``: small models trained on embedded data, no network.

Its data: :mod:`jaxcombine.tour.tasks` generates algorithmic tasks as text
(copy, reverse, sort, add, increment; ``"R3917=" -> "7193;"``) with a
character-level tokenizer and an exact-match scorer that any decoder or
ensemble plugs into; :mod:`jaxcombine.tour.corpus` splits the Python standard
library's sources into text domains by package (``email``, ``asyncio``,
``json``, ...) with a byte-level BPE tokenizer trained on them. The runner
and its sections live in :mod:`jaxcombine.tour.run` and
:mod:`jaxcombine.tour.sections`.
"""
