"""Auto-interpretation of a feature store's latents: explain them, then score the explanations.

``lightning-interp explain STORE`` (:mod:`~lightning_interp.autointerp.commands`); the
explainer and scorers follow EleutherAI delphi. See docs/autointerp.md.
"""
