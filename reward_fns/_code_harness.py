"""The code reward's test harness: runs as main.py in the sandbox, the program and its tests in this process.

The task arrives on stdin: the program, the test statements (already rewritten by reward_fns/code.py so
that comparisons, truth tests, arithmetic, `isinstance`, `all`, `any`, `bool` and `abs` call the guards
below) and, per statement, two random tokens: the harness prints the first when the test passes and the
second when the statement met a value it refused to judge. The program must not get at the tokens, nor
forge a verdict: the guards judge values by their exact built-in types, never by methods the program
wrote, and everything they use is bound before the program runs.
"""

import _abc
import _thread
import collections
import ctypes
import datetime
import decimal
import enum
import json
import operator
import os
import sys
import threading
import types
from importlib.machinery import EXTENSION_SUFFIXES

# Classes whose methods may decide a comparison: C types the program cannot patch, and the standard
# library's enum and collections classes, which the audit hook protects (their values are converted to
# plain built-ins before any comparison, so their own methods never judge).
TRUSTED = (
    object, type, type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set,
    frozenset, range, slice, type(Ellipsis), type(NotImplemented), decimal.Decimal, datetime.date,
    datetime.datetime, datetime.time, datetime.timedelta, datetime.timezone, collections.OrderedDict,
    collections.defaultdict, collections.deque, collections.Counter, enum.Enum, enum.IntEnum, enum.Flag,
    enum.IntFlag, type(enum.Enum),
) + tuple(getattr(enum, name) for name in ("StrEnum", "ReprEnum") if hasattr(enum, name))  # Python 3.11+
# Exact types whose values are compared as they are (immutable C types).
ATOMS = (
    type(None), bool, int, float, complex, str, bytes, bytearray, range, type(Ellipsis), decimal.Decimal,
    datetime.date, datetime.datetime, datetime.time, datetime.timedelta, datetime.timezone,
)
EQUALITY = ("__eq__", "__ne__")
ORDER = EQUALITY + ("__lt__", "__le__", "__gt__", "__ge__")
MEMBERSHIP = ("__contains__", "__iter__")
TRUTH = ("__bool__", "__len__")
ORDERING = ("Lt", "LtE", "Gt", "GtE")
HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time (in Python), as opposed to one in C
IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: a C type whose attributes cannot be set
COMPARISONS = {
    "Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
    "GtE": operator.ge, "In": lambda a, b, contains=operator.contains: contains(b, a),
    "NotIn": lambda a, b, contains=operator.contains: not contains(b, a), "Is": operator.is_,
    "IsNot": operator.is_not,
}
# Operator name -> (function, the dunder on the left operand's type, the one on the right's).
ARITHMETIC = {
    "Add": (operator.add, "__add__", "__radd__"), "Sub": (operator.sub, "__sub__", "__rsub__"),
    "Mult": (operator.mul, "__mul__", "__rmul__"), "Div": (operator.truediv, "__truediv__", "__rtruediv__"),
    "FloorDiv": (operator.floordiv, "__floordiv__", "__rfloordiv__"),
    "Mod": (operator.mod, "__mod__", "__rmod__"), "Pow": (operator.pow, "__pow__", "__rpow__"),
    "MatMult": (operator.matmul, "__matmul__", "__rmatmul__"),
    "LShift": (operator.lshift, "__lshift__", "__rlshift__"),
    "RShift": (operator.rshift, "__rshift__", "__rrshift__"),
    "BitOr": (operator.or_, "__or__", "__ror__"), "BitXor": (operator.xor, "__xor__", "__rxor__"),
    "BitAnd": (operator.and_, "__and__", "__rand__"), "USub": (operator.neg, "__neg__", None),
    "UAdd": (operator.pos, "__pos__", None), "Invert": (operator.invert, "__invert__", None),
    "abs": (abs, "__abs__", None),
}


def make_guards(refused: list) -> dict:
    """The guards the rewritten tests call. Every name they use at call time is a local of this function,
    bound before the program runs, so replacing a builtin or a module attribute later changes nothing.
    A refusal sets refused[0] (the harness reads it after the statement, whatever the program caught)."""
    type_, id_, getattr_, bool_, enumerate_, len_, list_, tuple_, dict_, set_, frozenset_ = (
        type, id, getattr, bool, enumerate, len, list, tuple, dict, set, frozenset
    )
    ValueError_, equality, order, membership, truth_dunders = ValueError, EQUALITY, ORDER, MEMBERSHIP, TRUTH
    ordering = ORDERING
    mro_of, dict_of = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
    flags_of, module_of = type.__dict__["__flags__"].__get__, type.__dict__["__module__"].__get__
    heap_type = HEAP_TYPE
    instancecheck, abc_meta, union = _abc._abc_instancecheck, __import__("abc").ABCMeta, types.UnionType
    trusted, atoms = {id(c) for c in TRUSTED}, {id(c) for c in ATOMS}
    comparisons, arithmetic = dict(COMPARISONS), dict(ARITHMETIC)
    # Exact copies of a value of a built-in type or of a subclass that does not change how it compares.
    converters = {
        id(int): int.__pos__, id(float): float.__pos__, id(complex): complex.__pos__, id(str): str.__str__,
        id(bytes): lambda v, get=bytes.__getitem__, whole=slice(None): get(v, whole), id(list): list.copy,
        id(tuple): lambda v, get=tuple.__getitem__, whole=slice(None): get(v, whole),
        id(dict): dict.copy, id(set): set.copy, id(frozenset): frozenset.copy, id(collections.deque): list,
    }
    identity, record = object(), object()  # markers no program can hold

    def refuse(what, t):
        refused[0] = True
        name = f"{getattr_(t, '__module__', '?')}.{getattr_(t, '__qualname__', '?')}"
        return ValueError_(f"the code reward does not trust {what} of {name}")

    def owner(mro, name):
        for cls in mro:
            if name in dict_of(cls):
                return cls
        return None

    def numpy_type(t):
        # numpy's arrays and scalars are C types (not heap types): no program can patch or imitate them.
        return not flags_of(t) & heap_type and module_of(t) == "numpy"

    def check(t, mro, dunders):
        for name in dunders:
            cls = owner(mro, name)
            if cls is not None and id_(cls) not in trusted and not numpy_type(cls):
                raise refuse(name, t)

    def numpy_value(value, t):
        """A numpy array or scalar as it is (its own operators judge it), unless it holds Python objects."""
        if getattr_(getattr_(value, "dtype", None), "hasobject", False):
            raise refuse("an object array", t)
        return value

    def plain(value, dunders):
        """The value as exact built-ins, or a marker compared by identity; refuses program-defined
        comparisons. Dataclasses become (marker, class, their compared fields)."""
        t = type_(value)
        if id_(t) in atoms:
            return value
        if t is list_ or t is tuple_:
            return t([plain(item, dunders) for item in value])
        if t is dict_:
            return {plain(k, dunders): plain(v, dunders) for k, v in dict_.items(value)}
        if t is set_ or t is frozenset_:
            return t([plain(item, dunders) for item in value])
        if numpy_type(t):
            return numpy_value(value, t)
        mro = mro_of(t)
        fields = owner(mro, "__dataclass_fields__")
        params = dict_of(fields).get("__dataclass_params__") if fields is not None else None
        if params is not None and getattr_(params, "eq", False):
            names = [
                name for name, field in dict_of(fields)["__dataclass_fields__"].items()
                if getattr_(field, "compare", True) and getattr_(field, "_field_type", None) is not None
                and getattr_(field._field_type, "name", None) == "_FIELD"
            ]
            return (record, (identity, id_(t)), tuple_([plain(getattr_(value, n), dunders) for n in names]))
        check(t, mro, dunders)
        for cls in mro:
            convert = converters.get(id_(cls))
            if convert is not None:
                return plain(convert(value), dunders)
        return (identity, id_(value))

    def compare(ops, *operands):
        dunders = equality
        for op in ops:  # the methods that would decide these operators must not be the program's
            dunders = dunders + (order if op in ordering else membership if op in ("In", "NotIn") else ())
        values = [plain(v, dunders) for v in operands]
        for k, op in enumerate_(ops):  # Python's result: the operator's, or a chain's first false one
            left, right = (operands[k], operands[k + 1]) if op in ("Is", "IsNot") else values[k : k + 2]
            result = comparisons[op](left, right)
            if k + 1 < len_(ops) and not bool_(result):
                return result
        return result

    def truth(value):
        t = type_(value)
        if id_(t) in atoms or t is list_ or t is tuple_ or t is dict_ or t is set_ or t is frozenset_:
            return bool_(value)
        if numpy_type(t):
            return bool_(numpy_value(value, t))
        mro = mro_of(t)
        check(t, mro, truth_dunders)
        for cls in mro:
            convert = converters.get(id_(cls))
            if convert is not None:
                return bool_(convert(value))
        return True  # neither __bool__ nor __len__ of its own: true, as in Python

    def arith(op, left, right=record):
        function, dunder, reflected = arithmetic[op]
        left_type = type_(left)
        check(left_type, mro_of(left_type), (dunder,))
        if right is record:
            return function(left)
        right_type = type_(right)
        check(right_type, mro_of(right_type), (reflected,))
        return function(left, right)

    def isinstance_(value, classinfo):
        kind = type_(classinfo)
        if kind is tuple_ or kind is union:
            items = classinfo if kind is tuple_ else classinfo.__args__
            return any_([isinstance_(value, c) for c in items])
        if kind is abc_meta:
            return bool_(instancecheck(classinfo, value))
        if kind is type_ or id_(kind) in trusted:
            return any_([cls is classinfo for cls in mro_of(type_(value))])
        raise refuse("__instancecheck__", kind)

    def all_(iterable):
        for item in iterable:
            if not truth(item):
                return False
        return True

    def any_(iterable):
        for item in iterable:
            if truth(item):
                return True
        return False

    return {
        "__aapa_compare__": compare, "__aapa_truth__": truth, "__aapa_arith__": arith,
        "__aapa_isinstance__": isinstance_, "__aapa_all__": all_, "__aapa_any__": any_,
    }


def snapshot(names: list) -> dict:
    """Copies of the modules the tests import, taken before the program can rebind their attributes."""
    copies = {}
    for name in names:
        try:
            __import__(name)
        except BaseException:
            continue  # the test's own import fails later, as it would anyway
        for prefix in [name.rsplit(".", k)[0] for k in range(name.count("."), -1, -1)]:
            if prefix not in copies and isinstance(sys.modules.get(prefix), types.ModuleType):
                copy = types.ModuleType(prefix)
                vars(copy).update(vars(sys.modules[prefix]))
                copies[prefix] = copy
    for name, copy in copies.items():  # `import a.b` must reach b's copy through a's
        parent, _, child = name.rpartition(".")
        if parent in copies:
            setattr(copies[parent], child, copy)
    return copies


def run(exec=exec, write=os.write, count_threads=_thread._count, new_dict=dict):
    # Defaults are bound here, before the program may replace builtins or module attributes.
    # Set in every copy of this process that the program forks, however it forks (a pid can repeat: a copy in
    # a new pid namespace may get this process's pid); no copy writes verdicts.
    forked = []
    os.register_at_fork(after_in_child=lambda: forked.append(True))
    task = json.loads(sys.stdin.readline())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    try:
        os.unlink("stdin")  # without a mount namespace the task file stays readable in the working directory
    except FileNotFoundError:
        pass
    report = os.dup(1)
    passed = [b"\n%s\n" % t.encode() for t in task["pass"]]
    untrusted = [b"\n%s\n" % t.encode() for t in task["refused"]]
    # Compiled now: the program must not see the tests' source, nor replace `compile`.
    statements = [
        (i, compile(source, f"test_{i}.py", "exec"), is_test)
        for i, (source, is_test) in enumerate(task["statements"])
    ]
    try:
        program = compile(task["program"], "solution.py", "exec")
    except BaseException:
        return
    refused = [False]
    protected = set()  # ids of the library functions the tests import, filled below
    id_, import_error, value_error = id, ImportError, ValueError

    def refuse(event, args):
        # Ways to look into this interpreter, where the tokens and the tests are: frames, the object graph,
        # tracing, audit hooks of its own (they see each test's source), hand-made bytecode, ctypes and
        # CPython's test modules; and new code or defaults for the library functions the tests import.
        frame = event == "object.__getattr__" and args[1] in ("tb_frame", "gi_frame", "cr_frame", "ag_frame")
        native = event == "import" and args[0].startswith(("ctypes", "_ctypes", "_test"))
        patch = event in ("object.__setattr__", "object.__delattr__") and id_(args[0]) in protected
        if frame or native or patch or event in (
            "sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__",
        ):
            # An ImportError for ctypes: libraries that can do without it (numpy) then import without it.
            raise (import_error if native else value_error)(event + " is not allowed in the code sandbox")

    # From here on, nothing this process imports gets ctypes: not the tests' modules, not the program.
    sys.addaudithook(refuse)
    copies = snapshot(task["imports"])
    real_import = __import__

    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        module = real_import(name, globals, locals, fromlist, level)
        if level == 0:
            wanted = name if fromlist else name.partition(".")[0]
            return copies.get(wanted, module)
        return module

    import builtins

    guards = make_guards(refused)
    test_builtins = {**vars(builtins), **guards, "__import__": import_}
    # What the tests, the guards and the library code they call rely on and the program could change in
    # place: the dicts of the modules the tests import and all their loaded submodules (np.array_equal reads
    # numpy._core.numeric, re.fullmatch re._compiler), of the modules written in C (`_sre`, `builtins`:
    # library code calls them, and nothing rebinds their names as it runs, unlike the lazy caches of Python
    # modules such as platform), and of the classes there and in TRUSTED. Class attributes are set without
    # an audit event, so all are compared after each statement. `sys` changes as programs run.
    tops = {name.partition(".")[0] for name in copies}

    def watch(name, module):
        origin = getattr(getattr(module, "__spec__", None), "origin", None) or ""
        in_c = origin == "built-in" or origin.endswith(tuple(EXTENSION_SUFFIXES))
        ours = name.partition(".")[0] in tops or in_c
        return isinstance(module, types.ModuleType) and name != "sys" and ours

    dicts = [vars(module) for name, module in list(sys.modules.items()) if watch(name, module)]
    classes = {id(c): c for c in TRUSTED}
    flags_of = type.__dict__["__flags__"].__get__
    for d in dicts:  # C types refuse attribute changes (Py_TPFLAGS_IMMUTABLETYPE): no need to watch them
        classes.update((id(v), v) for v in d.values() if isinstance(v, type) and not flags_of(v) & IMMUTABLE)
    dicts += [vars(c) for c in classes.values()]
    watched = [(d, dict(d), tuple(d), tuple(d.values())) for d in dicts]
    # Honest programs patch builtins for their own ends (a silent print): those patches are undone before
    # each statement, so that library code gets the real ones, and a patch made during one is refused.
    real_builtins, builtins_before = vars(builtins), dict(vars(builtins))
    protected.update(id(v) for d in dicts for v in d.values() if isinstance(v, types.FunctionType))
    module_type, type_, len_, all_, map_, is_ = types.ModuleType, type, len, all, map, operator.is_

    def intact():
        for current, before, keys, values in watched:
            # Fast: the same names bound to the same objects. By `is`: no method of the program's is asked,
            # and id() would call the audit hook once per name.
            if len_(current) == len_(keys) and all_(map_(is_, current.values(), values)) and all_(
                map_(is_, current, keys)
            ):
                continue
            for name, value in before.items():
                if current.get(name, intact) is not value:
                    return False
            for name in current:  # new names are allowed if they are submodules that were imported
                if name not in before and type_(current[name]) is not module_type:
                    return False
        return True

    threads = count_threads()
    namespace = {"__name__": "solution"}
    try:
        exec(program, namespace)
    except BaseException:
        return
    # The program's globals, less those named like a builtin or a guard, which would shadow what the tests
    # call (`len = lambda x: 3`, `__aapa_truth__ = ...`). The program's functions keep their own globals.
    tests = {name: value for name, value in namespace.items() if name not in test_builtins}
    tests["__name__"] = "tests"
    for i, code, is_test in statements:
        refused[0] = False
        tests["__builtins__"] = new_dict(test_builtins)  # a fresh copy: nothing a statement did to it stays
        for name in [name for name in real_builtins if name not in builtins_before]:
            del real_builtins[name]
        real_builtins.update(builtins_before)
        try:
            exec(code, tests)
            ok = True
        except BaseException:
            ok = False
        # A copy the program forked (before or during a test) holds the tokens too and would write the
        # verdicts of another answer: only this process's verdicts count.
        if forked:
            return
        # A thread the program left running could change what the next test sees; a guard's name in the
        # tests' globals can only come from the program (through a function the tests handed it).
        shadowed = False
        for name in guards:
            shadowed = shadowed or name in tests
            tests.pop(name, None)
        if refused[0] or shadowed or not intact() or count_threads() != threads:
            write(report, untrusted[i])
        elif ok and is_test:
            write(report, passed[i])


if __name__ == "__main__":  # run as main.py in the sandbox; importing this file does nothing
    # Not dumpable: /proc/<pid>/mem and the like then belong to root, even for this process. ctypes goes after
    # that (its memmove is not audited), and `refuse` keeps it from being imported again.
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    del ctypes
    for module in [module for module in sys.modules if module.startswith(("ctypes", "_ctypes"))]:
        del sys.modules[module]
    # Signal handlers are handed the frame they interrupt, but run in the main thread and can only be set from
    # it: the program runs in another one.
    thread = threading.Thread(target=run)
    try:
        thread.start()
    except RuntimeError:  # without a uid of its own, RLIMIT_NPROC counts all of the user's threads
        run()
    else:
        thread.join()
