"""The simulated reach task and what runs on it: the task and its scripted expert (:mod:`.task`), ``vla-edge
eval`` (:mod:`.evaluate`) and the simulated operator of ``vla-edge record --robot sim`` (:mod:`.teleoperator`).
"""
