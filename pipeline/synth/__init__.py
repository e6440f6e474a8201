"""The sample world: generated scenes written in the real VG / LAION / Flickr30k formats."""
