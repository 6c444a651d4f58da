"""Recorded episodes: the HDF5 format (:mod:`.format`: keys, file naming, the reader), its writer
(:mod:`.recorder`) and repair (:mod:`.repair`), ``vla-edge convert`` to LLaVA-VLA training data
(:mod:`.convert`) and the Rerun view of a run or an episode (:mod:`.view`).
"""
