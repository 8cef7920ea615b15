"""The project's own imports form no cycle (issue 18: a newcomer can read the modules bottom-up).

Every module of `melodi_t5x/` and `tasks/` is parsed with `ast` (nothing is imported), and every
import of a project module, at module level or inside a function, is an edge of the graph. An
import under `if TYPE_CHECKING:` never runs and does not count; neither does the implicit import of
a parent package (`from tasks import config` inside the `tasks` package). The graph must be
acyclic: a cycle is printed module by module. The layering is one-way: the launcher (`xm_launch/`)
imports the model package, never the other way round, and no library module imports
`unittest.mock` (patching belongs in tests).
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('melodi_t5x', 'tasks')


def project_modules() -> dict[str, str]:
  """Dotted module name -> file path, for every `.py` file of the project's packages."""
  out = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, package)):
      dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
      for name in sorted(filenames):
        if not name.endswith('.py'):
          continue
        rel = os.path.relpath(os.path.join(dirpath, name), REPO)[: -len('.py')]
        parts = rel.split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        out['.'.join(parts)] = os.path.join(dirpath, name)
  return out


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
    isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'
  )


def _imports(tree: ast.AST):
  """Import nodes that run (everything but the bodies of `if TYPE_CHECKING:`)."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      stack.extend(node.orelse)
      continue
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    stack.extend(ast.iter_child_nodes(node))


def imported_modules(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """The project modules that `module` imports (module level and inside functions)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = os.path.basename(path) == '__init__.py'
  out = set()
  for node in _imports(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    else:
      base = node.module or ''
      if node.level:  # relative import: resolved against this module's package
        package = module.split('.') if is_package else module.split('.')[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = '.'.join(package + ([base] if base else []))
      # `from a import b`: the module a.b if there is one, else a name defined in a.
      names = [
        f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base
        for alias in node.names
      ]
    for name in names:
      # `import a.b.c` runs a.b.c (its parents are not counted, see the module docstring).
      while name and name not in modules:
        name = name.rpartition('.')[0]
      if name and name != module:
        out.add(name)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = project_modules()
  return {m: imported_modules(m, p, modules) for m, p in modules.items()}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm (iterative); components of more than one module are cycles."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = 0
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        parent = work[-1][0]
        low[parent] = min(low[parent], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        out.append(sorted(component))
  return [c for c in out if len(c) > 1]


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
  """One cycle through the component's first module, as a path that returns to it."""
  members = set(component)
  start = component[0]
  parents = {start: None}
  queue = [start]
  while queue:
    node = queue.pop(0)
    for child in sorted(graph[node] & members):
      if child == start:
        path = [node]
        while parents[path[-1]] is not None:
          path.append(parents[path[-1]])
        return [*reversed(path), start]
      if child not in parents:
        parents[child] = node
        queue.append(child)
  return component


def test_the_graph_sees_function_level_imports():
  graph = import_graph()
  # Sanity: module-level and function-level imports are both edges.
  assert 'tasks.config' in graph['tasks.vocab']
  assert 'melodi_t5x.experiments' in graph['melodi_t5x.tools.paper_tables']
  assert 'melodi_t5x.t5x_gin' in graph['melodi_t5x.experiments']  # inside a function


def test_no_import_cycles():
  graph = import_graph()
  cycles = strongly_connected_components(graph)
  for component in cycles:
    print('import cycle:', ' -> '.join(a_cycle(graph, component)))
  assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(a_cycle(graph, c)) for c in cycles)


def external_imports(path: str) -> set[str]:
  """Every module name a file imports (`from a import b` gives a and a.b), project or not."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  out = set()
  for node in _imports(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif not node.level:
      out.add(node.module)
      out.update(f'{node.module}.{alias.name}' for alias in node.names)
  return out


def _offenders(*roots: str) -> list[str]:
  """'<module> imports <name>' for every import of a module `roots` names or one inside it."""
  return sorted(
    f'{module} imports {name}'
    for module, path in project_modules().items()
    for name in external_imports(path)
    if any(name == root or name.startswith(root + '.') for root in roots)
  )


def test_the_model_package_never_imports_the_launcher():
  assert not _offenders('xm_launch')


def test_no_library_module_patches_with_mock():
  assert not _offenders('unittest.mock', 'mock')
