"""Which model serves: :mod:`.registry` (versions in the bucket, the champion pointer,
rollback), :mod:`.gate` (the promotion decision, pure), :mod:`.provenance` (version names,
package versions, code revision, hashes)."""
