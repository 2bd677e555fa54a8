"""Operations on whole images, built on the engine: create, measure,
convert (and its one-pass qcow2 writer), and the request loop of bench."""
