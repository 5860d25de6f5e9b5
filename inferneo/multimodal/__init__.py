"""Images in prompts: what crosses to the engine core (:mod:`.inputs`), the vision-language settings read from a
checkpoint (:mod:`.config`), images in chat messages (:mod:`.chat`), reading images (:mod:`.image_loading`), and
the front end's side: a prompt's image placeholders made into the model's image tokens (:mod:`.prompts`)."""
