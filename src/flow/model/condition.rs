//! Task conditions (`when:`): expressions in the Common Expression Language
//! (CEL, through the `cel` crate), over the flow input and the outputs of the
//! tasks upstream.
//!
//! An expression sees two variables:
//! - `flow`: `flow.input.<field>`, `flow.instance` (the id, a string) and
//!   `flow.business_key` (a string or `null`);
//! - `tasks`: `tasks.<task>.output` (what the task returned; `null` for a task
//!   skipped by its own condition) and `tasks.<task>.status` (`"succeeded"` or
//!   `"skipped"`), for the tasks the conditioned task depends on, directly or
//!   through others.
//!
//! [`check`] runs when a definition is registered. The crate parses and
//! evaluates but has no type checker, so `check` walks the parsed expression:
//! every name must be one of the above (a task it depends on, a declared input
//! field), the operands of `&&`, `||`, `!`, comparisons and arithmetic must
//! have types that fit (a declared `string` input compared with a number is a
//! problem), every function must be one CEL defines, and the whole must be a
//! `bool`. Task outputs are dynamic: what is read from them is checked when the
//! condition is evaluated, and an evaluation error fails the task (see
//! [`evaluate`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use cel::common::ast::{Expr, IdedExpr, LiteralValue};
use cel::{Context, Program};
use serde_json::{Map, Value, json};

use super::definition::{InputField, ValueType};

/// The functions and macros of CEL's standard environment a condition may call,
/// with the type they return (`None`: dynamic).
const FUNCTIONS: &[(&str, Option<Ty>)] = &[
    ("size", Some(Ty::Num)),
    ("contains", Some(Ty::Bool)),
    ("startsWith", Some(Ty::Bool)),
    ("endsWith", Some(Ty::Bool)),
    ("matches", Some(Ty::Bool)),
    ("has", Some(Ty::Bool)),
    ("all", Some(Ty::Bool)),
    ("exists", Some(Ty::Bool)),
    ("exists_one", Some(Ty::Bool)),
    ("map", Some(Ty::List)),
    ("filter", Some(Ty::List)),
    ("int", Some(Ty::Num)),
    ("uint", Some(Ty::Num)),
    ("double", Some(Ty::Num)),
    ("string", Some(Ty::String)),
    ("bool", Some(Ty::Bool)),
    ("bytes", Some(Ty::Bytes)),
    ("dyn", None),
    ("type", None),
    ("max", Some(Ty::Num)),
    ("min", Some(Ty::Num)),
    ("duration", Some(Ty::Duration)),
    ("timestamp", Some(Ty::Timestamp)),
    ("getFullYear", Some(Ty::Num)),
    ("getMonth", Some(Ty::Num)),
    ("getDayOfMonth", Some(Ty::Num)),
    ("getDayOfWeek", Some(Ty::Num)),
    ("getDayOfYear", Some(Ty::Num)),
    ("getHours", Some(Ty::Num)),
    ("getMinutes", Some(Ty::Num)),
    ("getSeconds", Some(Ty::Num)),
    ("getMilliseconds", Some(Ty::Num)),
];

/// What the checker knows of a value's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    /// `int`, `uint` or `double` (CEL compares them with one another).
    Num,
    String,
    Bytes,
    Null,
    List,
    Map,
    Duration,
    Timestamp,
    /// Known only when evaluated (task outputs, untyped inputs).
    Dyn,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Num => "number",
            Ty::String => "string",
            Ty::Bytes => "bytes",
            Ty::Null => "null",
            Ty::List => "list",
            Ty::Map => "map",
            Ty::Duration => "duration",
            Ty::Timestamp => "timestamp",
            Ty::Dyn => "dyn",
        }
    }

    fn of_input(ty: ValueType) -> Ty {
        match ty {
            ValueType::String => Ty::String,
            ValueType::Number | ValueType::Integer => Ty::Num,
            ValueType::Boolean => Ty::Bool,
            ValueType::Object => Ty::Map,
            ValueType::Array => Ty::List,
            ValueType::Any => Ty::Dyn,
        }
    }

    /// Whether a value of type `self` may be used where `want` is needed.
    fn fits(self, want: Ty) -> bool {
        self == want || self == Ty::Dyn
    }
}

/// What a condition may refer to.
pub(crate) struct Names<'a> {
    /// The flow's declared input fields (empty: undeclared, anything goes).
    pub(crate) inputs: &'a BTreeMap<String, InputField>,
    /// Every task of the flow.
    pub(crate) tasks: &'a BTreeSet<&'a str>,
    /// The tasks the conditioned task depends on, directly or not.
    pub(crate) upstream: &'a BTreeSet<&'a str>,
}

/// Compiles `source`, or says why it does not parse.
pub(crate) fn compile(source: &str) -> Result<Arc<Program>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Program>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(p) = cache.lock().expect("condition cache").get(source) {
        return Ok(p.clone());
    }
    let program = Program::compile(source).map_err(|e| {
        e.to_string()
            .lines()
            .next()
            .unwrap_or("syntax error")
            .trim_start_matches("ERROR: ")
            .to_owned()
    })?;
    let program = Arc::new(program);
    let mut cache = cache.lock().expect("condition cache");
    // Definitions are few; a flood of distinct ones only costs recompiling.
    if cache.len() >= 4096 {
        cache.clear();
    }
    cache.insert(source.to_owned(), program.clone());
    Ok(program)
}

/// Every problem of condition `source` (empty: it compiles, refers only to
/// what it may, and is a `bool`).
pub(crate) fn check(source: &str, names: &Names<'_>) -> Vec<String> {
    let program = match compile(source) {
        Ok(p) => p,
        Err(e) => return vec![format!("does not parse: {e}")],
    };
    let mut checker = Checker {
        names,
        locals: Vec::new(),
        problems: Vec::new(),
    };
    let ty = checker.expr(program.expression());
    if !ty.fits(Ty::Bool) {
        checker.report(format!("is a {}, not a bool", ty.name()));
    }
    checker.problems
}

struct Checker<'a, 'n> {
    names: &'a Names<'n>,
    /// Comprehension variables in scope.
    locals: Vec<String>,
    problems: Vec<String>,
}

impl Checker<'_, '_> {
    fn report(&mut self, problem: String) {
        if !self.problems.contains(&problem) {
            self.problems.push(problem);
        }
    }

    fn expr(&mut self, e: &IdedExpr) -> Ty {
        match &e.expr {
            Expr::Unspecified => Ty::Dyn,
            Expr::Literal(l) => match l {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) | LiteralValue::Int(_) | LiteralValue::UInt(_) => Ty::Num,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
            },
            Expr::Ident(name) => self.path(&[name.as_str()]),
            Expr::Select(s) => {
                if let Some(mut path) = qualified(&s.operand) {
                    path.push(&s.field);
                    if s.test {
                        // has(a.b.c): a.b must exist, c is what is tested.
                        path.pop();
                        self.path(&path);
                        return Ty::Bool;
                    }
                    return self.path(&path);
                }
                let operand = self.expr(&s.operand);
                if !matches!(operand, Ty::Map | Ty::Dyn) {
                    self.report(format!(
                        "selects field {:?} of a {}, which has no fields",
                        s.field,
                        operand.name()
                    ));
                }
                if s.test { Ty::Bool } else { Ty::Dyn }
            }
            Expr::List(l) => {
                for x in &l.elements {
                    self.expr(x);
                }
                Ty::List
            }
            Expr::Map(m) => {
                for entry in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                        self.expr(&me.key);
                        self.expr(&me.value);
                    }
                }
                Ty::Map
            }
            Expr::Struct(s) => {
                self.report(format!(
                    "builds a message {:?}, which conditions cannot",
                    s.type_name
                ));
                Ty::Dyn
            }
            Expr::Comprehension(c) => {
                self.expr(&c.iter_range);
                let scope = self.locals.len();
                self.locals.push(c.iter_var.clone());
                if let Some(v) = &c.iter_var2 {
                    self.locals.push(v.clone());
                }
                self.locals.push(c.accu_var.clone());
                self.expr(&c.accu_init);
                self.expr(&c.loop_cond);
                self.expr(&c.loop_step);
                let ty = self.expr(&c.result);
                self.locals.truncate(scope);
                ty
            }
            Expr::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args),
        }
    }

    /// The type of the qualified name `path` (`flow.input.amount`).
    fn path(&mut self, path: &[&str]) -> Ty {
        let root = path[0];
        if self.locals.iter().any(|l| l == root) {
            return Ty::Dyn;
        }
        match (root, path.get(1), path.get(2), path.get(3)) {
            ("flow", None, ..) => Ty::Map,
            ("flow", Some(&"input"), None, _) => Ty::Map,
            ("flow", Some(&"input"), Some(field), rest) => {
                let inputs = self.names.inputs;
                if inputs.is_empty() {
                    return Ty::Dyn;
                }
                let Some(ty) = inputs.get(*field).map(InputField::ty) else {
                    self.report(format!("refers to undeclared flow input {field:?}"));
                    return Ty::Dyn;
                };
                let ty = Ty::of_input(ty);
                match rest {
                    None => ty,
                    Some(_) if matches!(ty, Ty::Map | Ty::Dyn) => Ty::Dyn,
                    Some(sub) => {
                        self.report(format!(
                            "selects {sub:?} of flow input {field:?}, which is a {} and has no fields",
                            ty.name()
                        ));
                        Ty::Dyn
                    }
                }
            }
            ("flow", Some(&"instance"), None, _) => Ty::String,
            ("flow", Some(&"business_key"), None, _) => Ty::Dyn,
            ("flow", Some(other), ..) => {
                self.report(format!(
                    "refers to flow.{other}, which does not exist (flow has input, instance and business_key)"
                ));
                Ty::Dyn
            }
            ("tasks", None, ..) => Ty::Map,
            ("tasks", Some(task), field, _) => {
                if !self.names.tasks.contains(task) {
                    self.report(format!("refers to unknown task {task:?}"));
                    return Ty::Dyn;
                }
                if !self.names.upstream.contains(task) {
                    self.report(format!(
                        "refers to task {task:?}, which is not among the tasks it depends on"
                    ));
                    return Ty::Dyn;
                }
                match field {
                    None => Ty::Map,
                    Some(&"output") => Ty::Dyn,
                    Some(&"status") if path.len() == 3 => Ty::String,
                    Some(other) => {
                        self.report(format!(
                            "refers to tasks.{task}.{other}, which does not exist (a task has output and status)"
                        ));
                        Ty::Dyn
                    }
                }
            }
            (other, ..) => {
                self.report(format!(
                    "refers to unknown name {other:?} (a condition sees flow.input.<field>, flow.instance, flow.business_key and tasks.<task>.output / .status)"
                ));
                Ty::Dyn
            }
        }
    }

    fn call(&mut self, name: &str, target: Option<&IdedExpr>, args: &[IdedExpr]) -> Ty {
        use cel::common::ast::operators as op;
        let target = target.map(|t| self.expr(t));
        let tys: Vec<Ty> = args.iter().map(|a| self.expr(a)).collect();
        let operator = name
            .trim_matches(|c| c == '_' || c == '@')
            .replace('_', " ");
        let both = |this: &mut Self, want: &[Ty], what: &str| -> bool {
            let ok = tys.iter().all(|t| *t == Ty::Dyn || want.contains(t));
            if !ok {
                let names: Vec<&str> = tys.iter().map(|t| t.name()).collect();
                this.report(format!("applies {what} to {}", names.join(" and ")));
            }
            ok
        };
        match name {
            op::LOGICAL_AND | op::LOGICAL_OR | op::LOGICAL_NOT | op::NOT_STRICTLY_FALSE => {
                for t in &tys {
                    if !t.fits(Ty::Bool) {
                        self.report(format!(
                            "uses a {} where {operator:?} needs a bool",
                            t.name()
                        ));
                    }
                }
                Ty::Bool
            }
            op::EQUALS | op::NOT_EQUALS => {
                if let [a, b] = tys[..]
                    && a != b
                    && a != Ty::Dyn
                    && b != Ty::Dyn
                    && a != Ty::Null
                    && b != Ty::Null
                {
                    self.report(format!(
                        "compares a {} with a {} (always {})",
                        a.name(),
                        b.name(),
                        name == op::NOT_EQUALS
                    ));
                }
                Ty::Bool
            }
            op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS => {
                let known: BTreeSet<&str> = tys
                    .iter()
                    .filter(|t| **t != Ty::Dyn)
                    .map(|t| t.name())
                    .collect();
                let orderable = tys.iter().all(|t| {
                    matches!(
                        t,
                        Ty::Num
                            | Ty::String
                            | Ty::Bytes
                            | Ty::Bool
                            | Ty::Duration
                            | Ty::Timestamp
                            | Ty::Dyn
                    )
                });
                if known.len() > 1 || !orderable {
                    let names: Vec<&str> = tys.iter().map(|t| t.name()).collect();
                    self.report(format!(
                        "orders a {} ({operator:?})",
                        names.join(" against a ")
                    ));
                }
                Ty::Bool
            }
            op::ADD => {
                let known: Vec<Ty> = tys.iter().copied().filter(|t| *t != Ty::Dyn).collect();
                match known.first() {
                    None => Ty::Dyn,
                    Some(first) if known.iter().all(|t| t == first) => {
                        if matches!(
                            first,
                            Ty::Num | Ty::String | Ty::Bytes | Ty::List | Ty::Duration
                        ) {
                            if known.len() == tys.len() {
                                *first
                            } else {
                                Ty::Dyn
                            }
                        } else {
                            both(self, &[Ty::Num, Ty::String, Ty::List], "+");
                            Ty::Dyn
                        }
                    }
                    // timestamp + duration, duration + timestamp.
                    Some(_)
                        if known
                            .iter()
                            .all(|t| matches!(t, Ty::Duration | Ty::Timestamp)) =>
                    {
                        Ty::Timestamp
                    }
                    Some(_) => {
                        let names: Vec<&str> = tys.iter().map(|t| t.name()).collect();
                        self.report(format!("adds {}", names.join(" and ")));
                        Ty::Dyn
                    }
                }
            }
            op::SUBSTRACT | op::MULTIPLY | op::DIVIDE | op::MODULO | op::NEGATE => {
                if tys
                    .iter()
                    .any(|t| matches!(t, Ty::Duration | Ty::Timestamp))
                {
                    return Ty::Dyn;
                }
                both(self, &[Ty::Num], &format!("{operator:?}"));
                Ty::Num
            }
            op::CONDITIONAL => {
                if let Some(c) = tys.first()
                    && !c.fits(Ty::Bool)
                {
                    self.report(format!("uses a {} as the test of '? :'", c.name()));
                }
                match tys[..] {
                    [_, a, b] if a == b => a,
                    _ => Ty::Dyn,
                }
            }
            op::INDEX | op::OPT_INDEX => {
                if let Some(t) = tys.first()
                    && !matches!(t, Ty::List | Ty::Map | Ty::Dyn)
                {
                    self.report(format!(
                        "indexes a {}, which is not a list or a map",
                        t.name()
                    ));
                }
                Ty::Dyn
            }
            op::IN => {
                if let Some(t) = tys.get(1)
                    && !matches!(t, Ty::List | Ty::Map | Ty::Dyn)
                {
                    self.report(format!("looks for a value 'in' a {}", t.name()));
                }
                Ty::Bool
            }
            _ => match FUNCTIONS.iter().find(|(f, _)| *f == name) {
                Some((_, ty)) => {
                    if matches!(name, "contains" | "startsWith" | "endsWith" | "matches")
                        && let Some(t) = target
                        && !matches!(t, Ty::String | Ty::Dyn | Ty::List)
                    {
                        self.report(format!("calls {name}() on a {}", t.name()));
                    }
                    ty.unwrap_or(Ty::Dyn)
                }
                None => {
                    self.report(format!("calls unknown function {name}()"));
                    Ty::Dyn
                }
            },
        }
    }
}

/// The segments of `a.b.c` (an identifier and selections), or `None`.
fn qualified(e: &IdedExpr) -> Option<Vec<&str>> {
    match &e.expr {
        Expr::Ident(name) => Some(vec![name.as_str()]),
        Expr::Select(s) if !s.test => {
            let mut path = qualified(&s.operand)?;
            path.push(&s.field);
            Some(path)
        }
        _ => None,
    }
}

/// What a condition is evaluated against.
pub(crate) struct Scope<'a> {
    /// The flow input.
    pub(crate) input: &'a Value,
    /// The instance id.
    pub(crate) instance: &'a str,
    /// Its business key.
    pub(crate) business_key: Option<&'a str>,
    /// The done tasks: (name, output, status).
    pub(crate) tasks: Vec<(&'a str, &'a Value, &'static str)>,
}

/// Evaluates condition `source` in `scope`: its value, or why it has none (it
/// does not parse, reads a field an output does not have, or is not a bool).
pub(crate) fn evaluate(source: &str, scope: &Scope<'_>) -> Result<bool, String> {
    let program = compile(source)?;
    let mut ctx = Context::default();
    let flow = json!({
        "input": scope.input,
        "instance": scope.instance,
        "business_key": scope.business_key,
    });
    let tasks: Map<String, Value> = scope
        .tasks
        .iter()
        .map(|(name, output, status)| {
            (
                (*name).to_owned(),
                json!({"output": output, "status": status}),
            )
        })
        .collect();
    ctx.add_variable("flow", flow).map_err(|e| e.to_string())?;
    ctx.add_variable("tasks", Value::Object(tasks))
        .map_err(|e| e.to_string())?;
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("the condition gave {other:?}, not a bool")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(source: &str) -> Vec<String> {
        let inputs: BTreeMap<String, InputField> = [
            ("amount".to_owned(), ValueType::Number.into()),
            ("country".to_owned(), ValueType::String.into()),
            ("vip".to_owned(), ValueType::Boolean.into()),
        ]
        .into();
        let tasks: BTreeSet<&str> = ["score", "review", "later"].into();
        let upstream: BTreeSet<&str> = ["score", "review"].into();
        check(
            source,
            &Names {
                inputs: &inputs,
                tasks: &tasks,
                upstream: &upstream,
            },
        )
    }

    #[test]
    fn well_typed_conditions_pass() {
        for ok in [
            "tasks.score.output.value < 50 && flow.input.amount > 100",
            "flow.input.country == 'NL' || flow.input.vip",
            "tasks.review.status == 'skipped' ? true : tasks.review.output.approved",
            "has(tasks.score.output.value) && size(flow.input.country) == 2",
            "flow.input.country in ['NL', 'BE'] && !flow.input.vip",
            "tasks.score.output.flags.exists(f, f == 'fraud')",
            "flow.input.country.startsWith('N')",
        ] {
            assert_eq!(problems(ok), Vec::<String>::new(), "{ok}");
        }
    }

    #[test]
    fn unknown_names_and_type_errors_are_problems() {
        for (bad, expected) in [
            ("flow.input.amout > 1", "undeclared flow input \"amout\""),
            ("tasks.nope.output.x", "unknown task \"nope\""),
            (
                "tasks.later.output.x == 1",
                "not among the tasks it depends on",
            ),
            (
                "tasks.score.result == 1",
                "tasks.score.result, which does not exist",
            ),
            ("amount > 1", "unknown name \"amount\""),
            ("flow.input.country > 5", "orders a string against a number"),
            (
                "flow.input.amount == 'x'",
                "compares a number with a string",
            ),
            ("flow.input.amount && true", "needs a bool"),
            ("flow.input.amount + 1", "is a number, not a bool"),
            ("frobnicate(1) == 1", "unknown function frobnicate()"),
            ("flow.input.amount >", "does not parse"),
            (
                "flow.input.country.x == 1",
                "which is a string and has no fields",
            ),
        ] {
            let found = problems(bad);
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "{bad}: {found:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn evaluation_sees_input_and_outputs() {
        let input = json!({"amount": 150, "country": "NL"});
        let output = json!({"value": 20});
        let scope = Scope {
            input: &input,
            instance: "i-1",
            business_key: None,
            tasks: vec![("score", &output, "succeeded")],
        };
        assert_eq!(
            evaluate(
                "tasks.score.output.value < 50 && flow.input.amount > 100",
                &scope
            ),
            Ok(true)
        );
        assert_eq!(evaluate("flow.input.country == 'BE'", &scope), Ok(false));
        // A field the output lacks is an evaluation error, not `false`.
        assert!(evaluate("tasks.score.output.missing > 1", &scope).is_err());
    }
}
