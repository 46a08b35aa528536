"""What two applications share: the tiny random-weight models (:mod:`.tiny_wan`,
:mod:`.tiny_scorers`), video files (:mod:`.videos`), prompt-group files (:mod:`.prompts`),
latent files (:mod:`.latents`) and the ``memflow`` parser's choices (:mod:`.cli_choices`).
Imports the library only."""
