"""Features for every utterance, the featurize stage's work: text encoders (`text`), audio read from any media
(`audio`), the hand-made acoustic sets (`acoustic`: openSMILE, librosa), speech encoders (`speech`), video frames
through image encoders (`vision`), and the stage itself over a dataset (`featurize`)."""
