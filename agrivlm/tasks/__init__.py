"""The question/answer grammar of every task, shared by the recipes, inference and the explorer.

:mod:`agrivlm.tasks.turns`: a turn's positions and placeholders; :mod:`agrivlm.tasks.questions`: the questions
recipes write and inference asks, and the fixed answers (one wording for training and asking).
"""
