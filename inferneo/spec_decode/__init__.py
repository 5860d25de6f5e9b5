"""Speculative decoding: draft tokens proposed on the host, verified by the model in one step.

``config.SpeculativeConfig`` says how drafts are made (``--speculative-config``); ``ngram.NgramProposer`` makes
them from the request's own tokens (prompt lookup); ``acceptance.accepted_prefix`` decides which of a verified
step's tokens a request keeps. (Nothing is imported here, so the command line reads the config without numpy.)
"""
