"""The streaming core: a sans-I/O `Session` per stream, and the pieces it is made of."""
