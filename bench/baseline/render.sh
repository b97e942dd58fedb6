#!/usr/bin/env bash
# The fleet rendered the way a team would script it without the operator:
# per instance, jq merges the type's JSON, the instance's overrides and the
# secrets into the existing files, keeping every other key, and replaces a
# file (temp file, optional fsync, rename) only when its content changed.
#
# usage: render.sh INPUT_DIR ENV_ROOT [--fsync]
#   INPUT_DIR/instances.txt       "<name> <type>" per line
#   INPUT_DIR/types/<type>.json   {"enabledPlugins", "extraKnownMarketplaces", "mcpServers"}
#   INPUT_DIR/overrides/<name>.json  the same keys, instance scope (wins per entry)
#   INPUT_DIR/secrets.json        {"NAME": "value"} for ${SECRET:NAME}
set -euo pipefail
in=$1
root=$2
fsync=${3:-}
empty=$(mktemp)
trap 'rm -f "$empty"' EXIT
echo '{}' >"$empty"

replace() { # tmp target
    if cmp -s "$1" "$2"; then
        rm -f "$1"
        return
    fi
    if [ "$fsync" = --fsync ]; then sync "$1"; fi
    mv -f "$1" "$2"
}

while read -r name type; do
    dir="$root/$name"
    mkdir -p "$dir"
    settings="$dir/settings.json"
    claude="$dir/.claude.json"
    # A file that is not there yet merges into an empty object.
    settings_in=$settings claude_in=$claude
    [ -s "$settings" ] || settings_in=$empty
    [ -s "$claude" ] || claude_in=$empty

    jq --slurpfile t "$in/types/$type.json" --slurpfile o "$in/overrides/$name.json" '
        . + {
          enabledPlugins: ($t[0].enabledPlugins + ($o[0].enabledPlugins // {})),
          extraKnownMarketplaces: ($t[0].extraKnownMarketplaces + ($o[0].extraKnownMarketplaces // {}))
        }' "$settings_in" >"$settings.tmp"
    replace "$settings.tmp" "$settings"

    jq --slurpfile t "$in/types/$type.json" --slurpfile o "$in/overrides/$name.json" \
        --slurpfile s "$in/secrets.json" '
        . + {
          mcpServers: (($t[0].mcpServers + ($o[0].mcpServers // {}))
            | walk(if type == "string"
                   then gsub("\\$\\{SECRET:(?<n>[A-Za-z0-9_]+)\\}"; $s[0][.n])
                   else . end))
        }' "$claude_in" >"$claude.tmp"
    replace "$claude.tmp" "$claude"
done <"$in/instances.txt"
