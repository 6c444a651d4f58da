"""Recorded episodes: the HDF5 recorder (:mod:`.recorder`), ``vla-edge convert`` to LLaVA-VLA training data
(:mod:`.convert`) and the Rerun view of a run or an episode (:mod:`.view`).
"""
