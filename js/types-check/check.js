// Type-checks wsbus.d.ts with `tsc --strict` the way README.md tells a TypeScript user
// to: its TypeScript section's tsconfig.json (the served types saved where its `paths`
// says), its quickstart's browser snippet as written, and usage.ts beside this file,
// all in a temporary folder. README and check cannot drift: both come from README.md.
// Run with `npm run typecheck` (from js/, after `npm ci`); exits non-zero on any error.

import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const JS = dirname(HERE);
const README = join(JS, "..", "README.md");
const SERVED = "/ws/wsbus.js"; // what the snippet imports: the client the bus serves

/** The text under the `##` heading `title`, up to the next `##` heading. */
function section(markdown, title) {
  const start = markdown.indexOf(`\n## ${title}\n`);
  if (start < 0) throw new Error(`README.md has no "## ${title}" section`);
  const end = markdown.indexOf("\n## ", start + 1);
  return markdown.slice(start, end < 0 ? undefined : end);
}

/** The bodies of the fenced code blocks in `text` whose language is `language`. */
function codeBlocks(text, language) {
  return [...text.matchAll(new RegExp("```" + language + "\\n([\\s\\S]*?)```", "g"))].map((m) => m[1]);
}

function only(items, what) {
  if (items.length !== 1) throw new Error(`README.md: expected exactly one ${what}, found ${items.length}`);
  return items[0];
}

/** The browser snippet's module script, exactly as README.md shows it. */
function browserSnippet(readme) {
  const blocks = codeBlocks(section(readme, "30-second quickstart"), "html");
  const html = only(blocks.filter((block) => block.includes(`from "${SERVED}"`)), `html block importing ${SERVED}`);
  const scripts = [...html.matchAll(/<script type="module">\n([\s\S]*?)<\/script>/g)].map((m) => m[1]);
  const script = only(scripts, "module script in that html block");
  if (!script.includes(`from "${SERVED}"`)) throw new Error(`README.md: the module script does not import ${SERVED}`);
  return script;
}

/** The tsconfig.json README.md's TypeScript section tells users to write. */
function readmeTsconfig(readme) {
  const config = JSON.parse(only(codeBlocks(section(readme, "TypeScript"), "json"), "json block in TypeScript"));
  const options = config.compilerOptions ?? {};
  if (options.strict !== true) throw new Error("README.md's tsconfig.json must set strict: true");
  const target = options.paths?.[SERVED];
  if (!Array.isArray(target) || target.length !== 1) {
    throw new Error(`README.md's tsconfig.json must map ${SERVED} to one file in compilerOptions.paths`);
  }
  return config;
}

function main() {
  const readme = readFileSync(README, "utf8");
  const config = readmeTsconfig(readme);
  const folder = mkdtempSync(join(tmpdir(), "wsbus-types-"));
  try {
    // As the user would have: the served wsbus.d.ts saved where `paths` points.
    const types = resolve(folder, config.compilerOptions.paths[SERVED][0]);
    mkdirSync(dirname(types), { recursive: true });
    copyFileSync(join(JS, "wsbus.d.ts"), types);
    writeFileSync(join(folder, "readme-snippet.ts"), browserSnippet(readme));
    copyFileSync(join(HERE, "usage.ts"), join(folder, "usage.ts"));
    const project = { ...config, files: ["readme-snippet.ts", "usage.ts"] };
    writeFileSync(join(folder, "tsconfig.json"), JSON.stringify(project, null, 2));

    const tsc = join(JS, "node_modules", "typescript", "bin", "tsc");
    const result = spawnSync(process.execPath, [tsc, "-p", ".", "--strict", "--noEmit", "--pretty", "false"], {
      cwd: folder,
      encoding: "utf8",
    });
    if (result.error) throw result.error;
    // tsc names the temporary folder's files: say which source each one is.
    const sources = new Map([
      ["readme-snippet.ts", "README.md (30-second quickstart, browser snippet)"],
      ["usage.ts", join(HERE, "usage.ts")],
      [relative(folder, types), join(JS, "wsbus.d.ts")],
    ]);
    const output = (result.stdout + result.stderr).replace(
      /^([^\s(]+)\(/gm,
      (whole, file) => `${sources.get(file) ?? file}(`,
    );
    if (result.status !== 0) {
      process.stderr.write(output);
      process.stderr.write("typecheck: failed\n");
      process.exitCode = 1;
      return;
    }
    console.log("typecheck: wsbus.d.ts, README.md's browser snippet and usage.ts pass tsc --strict");
  } finally {
    rmSync(folder, { recursive: true, force: true });
  }
}

main();
