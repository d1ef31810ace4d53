"""Stages 2-3: the DALI input pipeline, the two-column AlexNet and its training on Ray Train
(`python -m trainer.run`), evaluation (`python -m trainer.evaluate`) and the paper's figures
(`python -m trainer.figures`). trainer.checkpoint is contract 2, which serving imports."""
