"""Tasks as the models see them: :mod:`.tasks` (prompts, choice tokens, loaders, the classification loss),
:mod:`.generative` (prompt and answer pairs, the SFT loss, exact match), :mod:`.sources` (the seeds' prompts on the
packaged OLMo and SST-2 data, a user's files, OOD texts), :mod:`.packaged` (reading those rows) and
:mod:`.corruption` (seeded keyboard-typo shift)."""
