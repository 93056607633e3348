"""The data layer: read and check a corpus, load and augment its audio, synthesize the demo corpus."""
